//! `/metrics` as Prometheus reads it (issue 11): the live exposition of a keygate that has seen
//! every kind of event, fetched with curl, passes `promtool check metrics` (Prometheus' own
//! parser and linter, Debian package `prometheus`). Without promtool on the machine the test
//! says so and passes, except under CI (`CI` set), where .ci/run installs it and a missing
//! promtool fails.

mod common;

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

fn promtool() -> Option<std::path::PathBuf> {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join("promtool"))
            .find(|p| p.is_file())
    });
    if found.is_none() {
        assert!(
            std::env::var_os("CI").is_none(),
            "promtool not found (apt-get install prometheus); CI must run this check"
        );
        eprintln!("SKIPPED: promtool not installed (Debian package `prometheus`)");
    }
    found
}

/// `promtool check metrics` on `text`: (success, what promtool printed).
fn promtool_check(promtool: &std::path::Path, text: &str) -> (bool, String) {
    let mut child = Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn scrape(kg: &Keygate) -> String {
    let url = format!("http://{}/metrics", kg.admin.unwrap());
    let (code, body, err) = curl(&["-sS", "--fail", "--max-time", "10", &url]);
    assert_eq!(code, 0, "{err}");
    body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_metrics_pass_promtool_check_metrics() {
    let Some(promtool) = promtool() else { return };
    // promtool must be able to fail: a counter without `_total` and a duplicate TYPE are refused.
    let (ok, said) = promtool_check(
        &promtool,
        "# HELP x_requests Requests.\n# TYPE x_requests counter\nx_requests 1\n",
    );
    assert!(!ok, "promtool accepted a lint problem: {said}");

    let up = Upstream::start().await;
    let (token, hash) = new_key("metered");
    let (scoped, scoped_hash) = new_key("scoped");
    let kg = Keygate::builder()
        .upstream(&up)
        .admin()
        .key("metered", &hash, "rate_limit = \"1/min\"\nburst = 1")
        .key("scoped", &scoped_hash, "paths = [\"/v1/\"]")
        .start();
    let c = kg.client();
    // Before any traffic: only the families and their fixed label sets.
    let (ok, said) = promtool_check(&promtool, &scrape(&kg));
    assert!(ok, "promtool refused the idle exposition: {said}");

    // Every labelled family gets a series: 2xx and 4xx by key, rate limit, scope, auth failure.
    assert_eq!(
        c.get(&kg.url("/"), &[("x-api-key", &token)]).await.status,
        200
    );
    assert_eq!(
        c.get(&kg.url("/"), &[("x-api-key", &token)]).await.status,
        429
    );
    assert_eq!(
        c.get(&kg.url("/admin"), &[("x-api-key", &scoped)])
            .await
            .status,
        403
    );
    assert_eq!(c.get(&kg.url("/"), &[]).await.status, 401);
    let deadline = Instant::now() + Duration::from_secs(10);
    let text = loop {
        let text = scrape(&kg);
        if text.contains("keygate_requests_total{status_class=\"4xx\",key_id=\"\"}") {
            break text;
        }
        assert!(Instant::now() < deadline, "{text}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    for series in [
        "keygate_requests_total{status_class=\"2xx\",key_id=\"metered\"} 1",
        "keygate_rate_limited_total{key_id=\"metered\"} 1",
        "keygate_scope_denied_total{key_id=\"scoped\"} 1",
        "keygate_auth_failures_total{reason=\"missing\"} 1",
    ] {
        assert!(text.lines().any(|l| l == series), "{series}:\n{text}");
    }
    let (ok, said) = promtool_check(&promtool, &text);
    assert!(ok, "promtool refused the live exposition: {said}\n{text}");
    println!(
        "promtool check metrics: {} lines accepted",
        text.lines().count()
    );
    assert_no_secrets(&text, &[&token, &hash, &scoped, &scoped_hash]);
}
