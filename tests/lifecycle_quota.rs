//! Quotas (issue 12 §1, SPEC §9) over real TLS against the real binary: calendar windows that
//! reset at a simulated edge (the testing-only clock `KEYGATE_TEST_CLOCK_START`, so no test
//! waits for a real midnight), costs per route, the IETF RateLimit fields next to today's
//! `RateLimit-*`, usage that survives SIGTERM + restart, SIGHUP and a crash after the
//! write-behind. Cases from other gateways' trackers: Retry-After rounded up and never 0
//! (traefik#8573, hashicorp/boundary#4094), a reset that is not 0 on a refusal (apisix#9964),
//! 429 rather than 403 for quota (tyk#8191), a raised limit applying at once on reload
//! (kong#3175).

mod common;

use std::time::{Duration, Instant};

use common::*;

const CLOCK: &str = "KEYGATE_TEST_CLOCK_START";

/// The `"quota"` member of a `RateLimit` or `RateLimit-Policy` field: its parameters by name.
fn member(field: Option<&str>, name: &str) -> Vec<(String, i64)> {
    let field = field.unwrap_or_else(|| panic!("no field with {name}"));
    let m = field
        .split(", ")
        .find(|m| m.starts_with(&format!("\"{name}\";")))
        .unwrap_or_else(|| panic!("no {name} member in {field:?}"));
    m.split(';')
        .skip(1)
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap();
            (k.to_string(), v.parse().unwrap())
        })
        .collect()
}

fn param(field: Option<&str>, name: &str, p: &str) -> i64 {
    member(field, name)
        .into_iter()
        .find(|(k, _)| k == p)
        .unwrap_or_else(|| panic!("no {p} in {name} of {field:?}"))
        .1
}

/// A daily and a monthly quota used up ten simulated seconds before the end of January; both
/// refuse with Retry-After until the edge, log `quota_exceeded` once, and reset at the edge.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quota_exhausted_then_reset_at_the_window_edge() {
    let up = Upstream::start().await;
    let (daily, daily_hash) = new_key("daily");
    let (monthly, monthly_hash) = new_key("monthly");
    let kg = Keygate::builder()
        .upstream(&up)
        .admin()
        .key(
            "daily",
            &daily_hash,
            "quota = \"3/day\"\nrate_limit = \"100/s\"",
        )
        .key("monthly", &monthly_hash, "quota = \"2/month\"")
        .start_with(&[(CLOCK, "2030-01-31T23:59:50Z")], None);
    assert!(
        kg.logs().contains("TESTING ONLY"),
        "the test clock is announced:\n{}",
        kg.logs()
    );
    let c = kg.client();
    let url = kg.url("/work");

    for left in [2, 1, 0] {
        let r = c.get(&url, &[("x-api-key", &daily)]).await;
        assert_eq!(r.status, 200, "{}", r.text());
        // Today's fields stay (the rate limit), the draft's fields carry both policies.
        assert_eq!(r.header("ratelimit-limit"), Some("100"));
        let policy = r.header("ratelimit-policy");
        assert_eq!(param(policy, "quota", "q"), 3);
        assert_eq!(param(policy, "quota", "w"), 86_400);
        assert_eq!(param(policy, "burst", "q"), 100);
        assert_eq!(param(r.header("ratelimit"), "quota", "r"), left);
        let t = param(r.header("ratelimit"), "quota", "t");
        assert!(
            (1..=10).contains(&t),
            "reset within the simulated 10 s: {t}"
        );
    }
    for _ in 0..2 {
        let r = c.get(&url, &[("x-api-key", &daily)]).await;
        assert_eq!(r.status, 429, "quota is 429, not 403");
        assert_eq!(r.json()["error"], "quota exceeded");
        let retry: u64 = r.header("retry-after").unwrap().parse().unwrap();
        assert!(
            (1..=10).contains(&retry),
            "Retry-After ≥ 1 until the edge: {retry}"
        );
        let t = param(r.header("ratelimit"), "quota", "t");
        assert!(t >= 1, "reset is not 0 on a refusal");
        assert_eq!(param(r.header("ratelimit"), "quota", "r"), 0);
    }
    assert_eq!(up.count(), 3, "refused requests never reach the upstream");

    // The monthly key: January has 31 days.
    for status in [200, 200, 429] {
        let r = c.get(&url, &[("x-api-key", &monthly)]).await;
        assert_eq!(r.status, status);
        assert_eq!(
            param(r.header("ratelimit-policy"), "quota", "w"),
            31 * 86_400
        );
        assert!(
            r.header("ratelimit-limit").is_none(),
            "no rate limit, no legacy fields"
        );
    }
    let exceeded = eventually("two quota_exceeded events", &kg, || {
        let e = kg.events("quota_exceeded");
        (e.len() >= 2).then_some(e)
    })
    .await;
    assert_eq!(exceeded.len(), 2, "once per key and window:\n{}", kg.logs());
    assert_eq!(exceeded[0]["key_id"], "daily");
    assert_eq!(exceeded[0]["limit"], 3);
    let metrics = admin_get(&kg, "/metrics").await;
    assert!(
        metrics.contains("keygate_quota_exceeded_total{key_id=\"daily\"} 2"),
        "{metrics}"
    );
    assert!(
        metrics.contains("keygate_quota_used{key_id=\"daily\",period=\"day\"} 3"),
        "{metrics}"
    );

    // Past the simulated midnight (and the 1st of February) both work again.
    let deadline = Instant::now() + Duration::from_secs(30);
    let r = loop {
        let r = c.get(&url, &[("x-api-key", &daily)]).await;
        if r.status == 200 {
            break r;
        }
        assert_eq!(r.status, 429);
        assert!(Instant::now() < deadline, "the window never reset");
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    assert_eq!(param(r.header("ratelimit"), "quota", "r"), 2);
    assert!(param(r.header("ratelimit"), "quota", "t") > 86_000);
    let r = c.get(&url, &[("x-api-key", &monthly)]).await;
    assert_eq!(r.status, 200, "a new month");
    assert_eq!(
        param(r.header("ratelimit-policy"), "quota", "w"),
        28 * 86_400
    );
    // A new window may log quota_exceeded again; the old one did not log a third time.
    for _ in 0..3 {
        c.get(&url, &[("x-api-key", &daily)]).await;
    }
    eventually("the new window's quota_exceeded", &kg, || {
        (kg.events("quota_exceeded").len() == 3).then_some(())
    })
    .await;

    assert_no_secrets(&kg.logs(), &[&daily, &monthly, &daily_hash, &monthly_hash]);
}

/// `[quota_costs]`: the most specific rule wins; status polls are free, even over quota; no
/// other spelling of the expensive path buys the free rule (h1 and h2).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn costs_are_applied_per_route() {
    let up = Upstream::start().await;
    let (token, hash) = new_key("convert");
    let kg = Keygate::builder()
        .upstream(&up)
        .raw(
            "[quota_costs]\ndefault = 1\nrules = [\n  { methods = [\"GET\", \"HEAD\"], path = \"/api/v1/jobs\", cost = 0 },\n  { methods = [\"POST\"], path = \"/api/v1/convert\", cost = 2 },\n  { path = \"/api/v1/bulk\", cost = 10 },\n]",
        )
        .server("max_body_bytes = 1024")
        .key("convert", &hash, "quota = \"5/day\"")
        .start_with(&[(CLOCK, "2030-06-15T12:00:00Z")], None);
    let c = kg.client();
    let remaining = |r: &Got| param(r.header("ratelimit"), "quota", "r");

    let r = c
        .send(req("POST", &kg.url("/api/v1/convert"), &token))
        .await;
    assert_eq!((r.status, remaining(&r)), (200, 3));
    for _ in 0..3 {
        let r = c
            .get(&kg.url("/api/v1/jobs/17?x=1"), &[("x-api-key", &token)])
            .await;
        assert_eq!((r.status, remaining(&r)), (200, 3), "a status poll is free");
    }
    let r = c
        .send(req("DELETE", &kg.url("/api/v1/jobs/17"), &token))
        .await;
    assert_eq!(
        (r.status, remaining(&r)),
        (200, 2),
        "GET-only rule: DELETE costs 1"
    );
    let r = c.send(req("POST", &kg.url("/api/v1/bulk"), &token)).await;
    assert_eq!(r.status, 429, "costs more than is left");
    assert_eq!(remaining(&r), 2, "a refused request costs nothing");
    // A spelling of the convert path under the free prefix still costs 2 ...
    let r = c
        .send(req("POST", &kg.url("/api/v1/jobs/../convert"), &token))
        .await;
    assert_eq!((r.status, remaining(&r)), (200, 0), "cost 2, not 0");
    // ... and so do the others, over HTTP/2 too: refused now, which a free request never is.
    let h2 = kg.client_h2();
    for sneaky in [
        "/api/v1/jobs/%2e%2e/convert",
        "/api/v1/jobs/..%2fconvert",
        "/api/v1//convert",
        "/api/v1/jobs/..\\convert",
        "/api/v1/jobs/..;/convert",
    ] {
        let r = h2.send(req("POST", &kg.url(sneaky), &token)).await;
        assert_eq!(r.version, http::Version::HTTP_2);
        assert_eq!(r.status, 429, "{sneaky} costs 2, not 0");
    }
    // Used up: polls still pass, everything that costs is refused.
    let r = h2
        .get(&kg.url("/api/v1/jobs/17"), &[("x-api-key", &token)])
        .await;
    assert_eq!((r.status, remaining(&r)), (200, 0));
    let r = c.get(&kg.url("/other"), &[("x-api-key", &token)]).await;
    assert_eq!(r.status, 429);
    // Written by the time the access line of the last request is.
    kg.access_line(r.header("x-request-id").unwrap());
    assert_eq!(kg.events("quota_exceeded").len(), 1, "{}", kg.logs());
    assert_no_secrets(&kg.logs(), &[&token, &hash]);
}

fn state_used(kg: &Keygate, id: &str) -> Option<u64> {
    let text = std::fs::read_to_string(kg.dir.path().join("state.json")).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    v["quotas"][id]["used"].as_u64()
}

/// Usage survives SIGHUP (and a raised limit applies at once), SIGTERM + restart, and a crash
/// (SIGKILL) once the write-behind has run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_survives_reload_restart_and_crash() {
    let up = Upstream::start().await;
    let (token, hash) = new_key("steady");
    let env = [(CLOCK, "2030-06-15T12:00:00Z")];
    let builder = |quota: &str| {
        Keygate::builder().upstream(&up).state().key(
            "steady",
            &hash,
            &format!("quota = \"{quota}\""),
        )
    };
    let kg = builder("5/day").start_with(&env, None);
    let c = kg.client();
    let remaining = |r: &Got| param(r.header("ratelimit"), "quota", "r");
    for _ in 0..5 {
        assert_eq!(
            c.get(&kg.url("/"), &[("x-api-key", &token)]).await.status,
            200
        );
    }
    assert_eq!(
        c.get(&kg.url("/"), &[("x-api-key", &token)]).await.status,
        429
    );

    // SIGHUP with the limit raised: the count stays, the new limit applies at once.
    std::fs::write(&kg.config, builder("8/day").config_text()).unwrap();
    kg.signal("HUP");
    eventually("reload", &kg, || {
        kg.events("config_reloaded").into_iter().next()
    })
    .await;
    let r = c.get(&kg.url("/"), &[("x-api-key", &token)]).await;
    assert_eq!((r.status, remaining(&r)), (200, 2), "5 used + 1 of 8");

    // SIGTERM writes the state; the next process counts on from it.
    kg.signal("TERM");
    let mut kg = kg;
    assert_eq!(kg.wait_exit(Duration::from_secs(10)), Some(0));
    assert_eq!(state_used(&kg, "steady"), Some(6));
    let kg = kg.restart(&env);
    let c = kg.client();
    let r = c.get(&kg.url("/"), &[("x-api-key", &token)]).await;
    assert_eq!(
        (r.status, remaining(&r)),
        (200, 1),
        "usage survived the restart"
    );

    // A crash after the write-behind (≤ 5 s) loses nothing.
    eventually("write-behind", &kg, || {
        (state_used(&kg, "steady") == Some(7)).then_some(())
    })
    .await;
    kg.signal("KILL");
    let kg = kg.restart(&env);
    let c = kg.client();
    let r = c.get(&kg.url("/"), &[("x-api-key", &token)]).await;
    assert_eq!(
        (r.status, remaining(&r)),
        (200, 0),
        "usage survived the crash"
    );
    assert_eq!(
        c.get(&kg.url("/"), &[("x-api-key", &token)]).await.status,
        429
    );
    assert_no_secrets(&kg.logs(), &[&token, &hash]);
    let state = std::fs::read_to_string(kg.dir.path().join("state.json")).unwrap();
    assert_no_secrets(&state, &[&token, &hash]);
}
