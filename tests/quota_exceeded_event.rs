//! `quota_exceeded` means the quota is used up (fresh user T5-18). A request costing more than
//! the key's remaining quota is refused (429) without spending the once-per-window event: it
//! is logged as `quota_insufficient` under the client log budget, with used/cost/limit, and
//! the event comes at the first refusal that finds no unit left. A request costing more than
//! the whole quota gets 429 without a `Retry-After` (no wait would let it pass), and `check`
//! warns about such a cost for every key whose scope can send it. Real TLS, real upstream.

mod common;

use common::cli::keygate_cli;
use common::*;
use serde_json::json;

const COSTS: &str = r#"
[quota_costs]
rules = [
  { methods = ["POST"], path = "/c", cost = 10 },
  { methods = ["POST"], path = "/d", cost = 3 },
]
"#;

async fn used(kg: &Keygate, token: &str) -> u64 {
    let got = kg
        .client()
        .get(&kg.url("/.well-known/keygate/key"), &[("x-api-key", token)])
        .await;
    assert_eq!(got.status, 200, "{}", got.text());
    got.json()["quota"]["used"].as_u64().unwrap()
}

/// T5-18's two reproductions in one window: `POST /c` (cost 10 > quota 5) at `used: 0` logged
/// "quota used up" and was told `Retry-After` until the reset; `POST /d` (cost 3) with 2 left
/// did the same; the real exhaustion later was silent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quota_exceeded_is_logged_when_the_quota_is_used_up() {
    let up = Upstream::start().await;
    let (token, hash) = new_key("rl4");
    let kg = Keygate::builder()
        .upstream(&up)
        .key("rl4", &hash, "quota = \"5/day\"")
        .raw(COSTS)
        .start();
    let c = kg.client();
    let send = async |method: &str, path: &str| c.send(req(method, &kg.url(path), &token)).await;

    // More than the whole quota: refused, no promise to retry, no "used up".
    let r = send("POST", "/c").await;
    assert_eq!(r.status, 429);
    assert_eq!(r.json()["error"], "quota exceeded");
    assert_eq!(
        r.header("retry-after"),
        None,
        "a cost-10 request never passes a 5/day quota (old code: Retry-After until the reset)"
    );
    assert!(
        r.header("ratelimit")
            .is_some_and(|v| v.contains("\"quota\";r=5")),
        "{:?}",
        r.headers
    );
    let line = kg.wait_log("quota_insufficient", |v| v["event"] == "quota_insufficient");
    assert_eq!(
        [&line["used"], &line["cost"], &line["limit"], &line["never"]],
        [&json!(0), &json!(10), &json!(5), &json!(true)],
        "{line}"
    );
    assert!(
        kg.events("quota_exceeded").is_empty(),
        "5 of 5 units free: not used up (old code: quota_exceeded at used 0)"
    );
    assert_eq!(used(&kg, &token).await, 0);

    // More than what is left, not more than the quota: refused with Retry-After, no event.
    assert_eq!(send("POST", "/d").await.status, 200);
    let r = send("POST", "/d").await;
    assert_eq!(r.status, 429);
    assert!(
        r.header("retry-after").is_some(),
        "it will pass after the reset"
    );
    let line = kg.wait_log("second quota_insufficient", |v| {
        v["event"] == "quota_insufficient" && v["cost"] == 3
    });
    assert_eq!([&line["used"], &line["never"]], [&json!(3), &json!(false)]);
    assert!(kg.events("quota_exceeded").is_empty(), "2 units left");

    // The cheap requests use the quota up; the next refusal is the window's one event.
    assert_eq!(send("GET", "/x").await.status, 200);
    assert_eq!(send("GET", "/x").await.status, 200);
    assert_eq!(used(&kg, &token).await, 5);
    for _ in 0..3 {
        let r = send("GET", "/x").await;
        assert_eq!(r.status, 429);
        assert!(r.header("retry-after").is_some());
    }
    let ev = kg.wait_log("quota_exceeded", |v| v["event"] == "quota_exceeded");
    assert_eq!([&ev["used"], &ev["limit"]], [&json!(5), &json!(5)]);
    assert_eq!(kg.events("quota_exceeded").len(), 1, "once per window");
    assert_eq!(
        kg.events("quota_insufficient").len(),
        2,
        "used up is not 'insufficient'"
    );
    assert_no_secrets(&kg.logs(), &[&token]);
}

/// `check` names the rule and every key (with its role) whose scope can send a request the
/// rule prices above the key's whole quota; keys the scope keeps away are not named. Still
/// `ok`: the file is valid, the request is refused at run time.
#[test]
fn check_warns_about_a_cost_above_a_whole_quota() {
    let (_, h) = new_key("x");
    let b = Keygate::builder()
        .key(
            "getonly",
            &h,
            "quota = \"5/day\"\nmethods = [\"GET\", \"HEAD\"]",
        )
        .key("poster", &h, "quota = \"5/day\"")
        .key("elsewhere", &h, "role = \"small\"\npaths = [\"/other\"]")
        .key("staff", &h, "role = \"small\"")
        .key("big", &h, "quota = \"100/day\"")
        .raw(&format!("{COSTS}\n[roles.small]\nquota = \"8/day\"\n"));
    let (_dir, config) = b.config_dir();
    let (code, out, err) = keygate_cli(&["check"], &config);
    assert_eq!((code, out.trim()), (0, "ok"), "{err}");
    let w: Vec<&str> = err.lines().filter(|l| l.contains("quota_costs")).collect();
    assert_eq!(
        w.len(),
        1,
        "one rule is over a quota (old code: none):\n{err}"
    );
    assert!(
        w[0].starts_with("warning: quota_costs.rules[0].cost: 10 "),
        "{err}"
    );
    assert!(w[0].contains("key \"poster\" (5/day)"), "{err}");
    assert!(
        w[0].contains("key \"staff\" (8/day, role \"small\")"),
        "{err}"
    );
    for not in ["getonly", "elsewhere", "big"] {
        assert!(!w[0].contains(not), "{not}: {err}");
    }
}
