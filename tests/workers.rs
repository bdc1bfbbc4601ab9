//! Runtime shape (issue 10): each of `[server] workers` is a thread with its own event loop,
//! accepting from the shared listener; the access log is batched by a writer thread.

mod common;

use common::*;

fn thread_names(pid: u32) -> Vec<String> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .map(|n| n.trim().to_string())
        .collect()
}

/// `workers = 2` (the harness default): a second event-loop thread (`keygate-w1`; the main
/// thread is worker 0) exists,
/// and concurrent connections over HTTP/1.1 and HTTP/2, whichever worker accepted them, are all
/// served, each request with exactly one whole access line whose `duration_ms` has 3 decimals.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn workers_serve_concurrent_connections_with_one_whole_access_line_each() {
    let up = Upstream::start().await;
    let (token, hash) = new_key("w");
    let kg = Keygate::builder().upstream(&up).key("w", &hash, "").start();
    let names = thread_names(kg.pid());
    assert!(
        names.iter().any(|n| n == "keygate-w1"),
        "no second worker thread: {names:?}"
    );
    assert!(names.iter().any(|n| n == "keygate-log"), "{names:?}");

    // The key's first use (argon2) goes alone: a network's unverified requests queue one at a
    // time (issue 9), which is not what this test is about.
    let first = kg
        .client()
        .get(&kg.url("/w/first"), &[("x-api-key", &token)])
        .await;
    assert_eq!(first.status, 200, "{}", first.text());

    let mut tasks = Vec::new();
    for i in 0..40 {
        // A client per task: its own connection (or, for h2, its own connection and streams).
        let c = if i % 2 == 0 {
            kg.client()
        } else {
            kg.client_h2()
        };
        let url = kg.url(&format!("/w/{i}"));
        let token = token.clone();
        tasks.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            for _ in 0..5 {
                let r = c.get(&url, &[("x-api-key", &token)]).await;
                assert_eq!(r.status, 200, "{}", r.text());
                ids.push(r.header("x-request-id").unwrap().to_string());
            }
            ids
        }));
    }
    let mut ids = Vec::new();
    for t in tasks {
        ids.extend(t.await.unwrap());
    }
    assert_eq!(ids.len(), 200);
    assert_eq!(up.count(), 201);
    for id in &ids {
        kg.access_line(id);
    }
    let logs = kg.logs();
    for id in &ids {
        let lines: Vec<&str> = logs
            .lines()
            .filter(|l| l.contains("\"msg\":\"request\"") && l.contains(id.as_str()))
            .collect();
        assert_eq!(lines.len(), 1, "access lines for {id}: {lines:?}");
        let v: serde_json::Value = serde_json::from_str(lines[0]).expect("whole JSON line");
        assert_eq!(v["status"], 200);
        let raw = lines[0].split("\"duration_ms\":").nth(1).unwrap();
        let raw = &raw[..raw.find(',').unwrap()];
        let decimals = raw.split('.').nth(1).map_or(0, str::len);
        assert_eq!(decimals, 3, "duration_ms {raw}");
    }
}
