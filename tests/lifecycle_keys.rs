//! Key lifecycle (issue 12 §2–§6, SPEC §9) over real TLS against the real binary: roles and
//! their overrides, per-role rotation in `keygate keys`, new-network detection from a second
//! loopback address, the introspection endpoint, and the upstream exposure check.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use http::Request;
use http_body_util::BodyExt;

fn ago(days: i64) -> String {
    jiff::Timestamp::now()
        .checked_sub(jiff::SignedDuration::from_hours(24 * days))
        .unwrap()
        .strftime("%Y-%m-%dT%H:%M:%SZ")
        .to_string()
}

const ROLES: &str = "[roles.staging]\nmethods = [\"GET\", \"POST\"]\npaths = [\"/api\"]\nrate_limit = \"100/min\"\nburst = 7\nquota = \"50/day\"\nrotation_period = \"180d\"\n";

/// A key takes its role's fields unless it sets them; built-ins `read-only` and `full`; a bad
/// reference is refused by `check` and by a reload, naming the TOML path.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roles_with_overrides_and_bad_references() {
    let up = Upstream::start().await;
    let (stage, stage_hash) = new_key("stage");
    let (reader, reader_hash) = new_key("reader");
    let (admin_t, admin_hash) = new_key("boss");
    let (own, own_hash) = new_key("own");
    let builder = Keygate::builder()
        .upstream(&up)
        .state()
        .raw(ROLES)
        .key(
            "stage",
            &stage_hash,
            &format!(
                "role = \"staging\"\nquota = \"5/day\"\ncreated = {}",
                ago(100)
            ),
        )
        .key(
            "reader",
            &reader_hash,
            &format!("role = \"read-only\"\ncreated = {}", ago(100)),
        )
        .key(
            "boss",
            &admin_hash,
            &format!("role = \"full\"\ncreated = {}", ago(10)),
        )
        .key(
            "own",
            &own_hash,
            &format!(
                "role = \"staging\"\npaths = [\"/other\"]\nrotation_period = \"30d\"\ncreated = {}",
                ago(40)
            ),
        );
    let good_config = builder.config_text();
    let kg = builder.start();
    let c = kg.client();

    // staging: its methods, paths, rate limit and burst; the key's own quota.
    let r = c.get(&kg.url("/api/x"), &[("x-api-key", &stage)]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("ratelimit-limit"), Some("7"), "role's burst");
    assert!(
        r.header("ratelimit-policy")
            .unwrap()
            .contains("\"quota\";q=5;")
    );
    assert_eq!(
        c.get(&kg.url("/other"), &[("x-api-key", &stage)])
            .await
            .status,
        403
    );
    assert_eq!(
        c.send(req("DELETE", &kg.url("/api/x"), &stage))
            .await
            .status,
        403
    );
    // own: the role's methods, its own paths.
    assert_eq!(
        c.get(&kg.url("/other/y"), &[("x-api-key", &own)])
            .await
            .status,
        200
    );
    assert_eq!(
        c.get(&kg.url("/api/x"), &[("x-api-key", &own)])
            .await
            .status,
        403
    );
    assert_eq!(
        c.send(req("PUT", &kg.url("/other/y"), &own)).await.status,
        403
    );
    // read-only: GET, HEAD, OPTIONS anywhere; nothing else.
    for m in ["GET", "HEAD", "OPTIONS"] {
        assert_eq!(
            c.send(req(m, &kg.url("/any/path"), &reader)).await.status,
            200,
            "{m}"
        );
    }
    for m in ["POST", "PUT", "DELETE", "PATCH"] {
        assert_eq!(
            c.send(req(m, &kg.url("/any/path"), &reader)).await.status,
            403,
            "{m}"
        );
    }
    // full: anything.
    assert_eq!(
        c.send(req("DELETE", &kg.url("/x"), &admin_t)).await.status,
        200
    );

    // `keygate keys` shows each key's role; rotation follows the key's, else its role's period.
    let (code, out, err) = keygate_cli(&["keys"], &kg.config);
    assert_eq!(code, 0, "{err}");
    let row = |id: &str| {
        out.lines()
            .find(|l| l.split_whitespace().next() == Some(id))
            .unwrap_or_else(|| panic!("no row for {id}:\n{out}"))
            .to_string()
    };
    assert!(out.lines().next().unwrap().contains("ROLE"), "{out}");
    let r = row("stage");
    assert!(r.contains(" staging "), "{r}");
    assert!(
        !r.contains("rotation period"),
        "100 days < the role's 180: {r}"
    );
    assert!(row("reader").contains(" read-only "));
    assert!(
        row("reader").contains("older than the rotation period (100 days old)"),
        "the default 90 days: {out}"
    );
    assert!(row("boss").contains(" full "));
    assert!(
        row("own").contains("older than the rotation period (40 days old)"),
        "the key's own 30 days: {out}"
    );

    // Bad references: check refuses them with their TOML paths; a reload keeps the old config.
    let bad = good_config.replace("role = \"read-only\"", "role = \"read-onyl\"")
        + "\n[roles.full]\nmethods = [\"GET\"]\n[roles.broken]\nquota = \"10/week\"\nmethods = [\"G T\"]\n";
    let bad_path = kg.dir.path().join("bad.toml");
    std::fs::write(&bad_path, &bad).unwrap();
    let (code, _, err) = keygate_cli(&["check"], &bad_path);
    assert_eq!(code, 1, "{err}");
    for want in [
        "keys[1].role",
        "unknown role \"read-onyl\" (built-in: read-only, full, defined: broken, staging)",
        "roles.full: is a built-in role",
        "roles.broken.quota: invalid quota \"10/week\"",
        "roles.broken.methods[0]: invalid method",
    ] {
        assert!(err.contains(want), "{want} missing:\n{err}");
    }
    std::fs::write(&kg.config, &bad).unwrap();
    kg.signal("HUP");
    let failed = eventually("reload failure", &kg, || {
        kg.events("config_reload_failed").into_iter().next()
    })
    .await;
    assert!(
        failed["error"].as_str().unwrap().contains("read-onyl"),
        "{failed}"
    );
    assert_eq!(
        c.get(&kg.url("/z"), &[("x-api-key", &reader)]).await.status,
        200
    );
    assert_eq!(
        c.send(req("POST", &kg.url("/z"), &reader)).await.status,
        403
    );
    assert_no_secrets(
        &(kg.logs() + &out + &err),
        &[&stage, &reader, &admin_t, &own, &stage_hash, &reader_hash],
    );
}

/// One HTTP/1.1 request over TLS from a chosen local address (a second loopback address).
async fn get_from(kg: &Keygate, source: &str, path: &str, token: &str) -> u16 {
    let source: std::net::Ipv4Addr = source.parse().unwrap();
    let tls = kg.tls_from(source.octets()).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    let r = send
        .send_request(
            Request::get(path)
                .header("host", "localhost")
                .header("x-api-key", token)
                .body(empty())
                .unwrap(),
        )
        .await
        .unwrap();
    let status = r.status().as_u16();
    let _ = r.into_body().collect().await;
    status
}

/// First use, a known network, then a new one (127.0.0.2 with /32 networks): one event each,
/// the metric, and the count in `keygate keys`; the history survives a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_network_from_a_second_loopback_address() {
    let up = Upstream::start().await;
    let (token, hash) = new_key("roamer");
    let kg = Keygate::builder()
        .upstream(&up)
        .admin()
        .state()
        .raw("[key_networks]\nipv4_prefix = 32\nremember = \"30d\"\nmax_per_key = 8")
        .key("roamer", &hash, "")
        .start();
    assert_eq!(get_from(&kg, "127.0.0.1", "/a", &token).await, 200);
    let first = eventually("key_first_use", &kg, || {
        kg.events("key_first_use").into_iter().next()
    })
    .await;
    assert_eq!(first["key_id"], "roamer");
    assert_eq!(first["client_ip"], "127.0.0.1");
    assert_eq!(get_from(&kg, "127.0.0.1", "/b", &token).await, 200);
    assert_eq!(get_from(&kg, "127.0.0.2", "/c", &token).await, 200);
    let new = eventually("key_new_network", &kg, || {
        kg.events("key_new_network").into_iter().next()
    })
    .await;
    assert_eq!(new["key_id"], "roamer");
    assert_eq!(new["client_ip"], "127.0.0.2");
    assert_eq!(new["previous_networks"], 1);
    assert_eq!(new["level"], "WARN");
    assert_eq!(get_from(&kg, "127.0.0.2", "/d", &token).await, 200);
    let metrics = admin_get(&kg, "/metrics").await;
    assert!(
        metrics.contains("keygate_key_new_network_total{key_id=\"roamer\"} 1"),
        "{metrics}"
    );
    assert_eq!(kg.events("key_new_network").len(), 1, "{}", kg.logs());
    assert_eq!(kg.events("key_first_use").len(), 1);

    kg.signal("TERM");
    let mut kg = kg;
    assert_eq!(kg.wait_exit(Duration::from_secs(10)), Some(0));
    let (code, out, err) = keygate_cli(&["keys"], &kg.config);
    assert_eq!(code, 0, "{err}");
    let row = out.lines().find(|l| l.starts_with("roamer")).unwrap();
    assert!(out.lines().next().unwrap().contains("NETWORKS"));
    assert!(
        row.split_whitespace().any(|w| w == "2"),
        "two networks: {row}"
    );
    // After a restart both networks are known: no event for either, and no first use.
    let kg = kg.restart(&[]);
    assert_eq!(get_from(&kg, "127.0.0.2", "/e", &token).await, 200);
    assert_eq!(get_from(&kg, "127.0.0.1", "/f", &token).await, 200);
    assert_eq!(get_from(&kg, "127.0.0.3", "/g", &token).await, 200);
    let again = eventually("key_new_network after restart", &kg, || {
        kg.events("key_new_network").into_iter().next()
    })
    .await;
    assert_eq!(again["client_ip"], "127.0.0.3");
    assert_eq!(again["previous_networks"], 2);
    assert!(kg.events("key_first_use").is_empty(), "{}", kg.logs());
    assert_no_secrets(&(kg.logs() + &out), &[&token, &hash]);
}

/// The key holder's own view: content, no secrets, free, never forwarded, in every spelling.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn introspection_shows_the_key_and_nothing_else() {
    let up = Upstream::start().await;
    let (token, hash) = new_key("client-dev");
    let (other, other_hash) = new_key("neighbour");
    let kg = Keygate::builder()
        .upstream(&up)
        .raw(ROLES)
        .key(
            "client-dev",
            &hash,
            "role = \"staging\"\nrate_limit = \"50/s\"\nburst = 100\nallow = [\"127.0.0.0/8\"]\nexpires = 2031-01-01T00:00:00Z",
        )
        .key("neighbour", &other_hash, "quota = \"9/day\"")
        .start();
    let c = kg.client();
    let path = "/.well-known/keygate/key";
    let r = c.get(&kg.url(path), &[("x-api-key", &token)]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert_eq!(r.header("cache-control"), Some("no-store"));
    let v = r.json();
    assert_eq!(v["id"], "client-dev");
    assert_eq!(v["role"], "staging");
    assert_eq!(v["scopes"]["methods"], serde_json::json!(["GET", "POST"]));
    assert_eq!(v["scopes"]["paths"], serde_json::json!(["/api"]));
    assert_eq!(v["expires"], "2031-01-01T00:00:00Z");
    assert_eq!(v["rate_limit"]["rate"], "50/s", "the key's own");
    assert_eq!(v["rate_limit"]["burst"], 100);
    assert_eq!(
        v["rate_limit"]["remaining"], 99,
        "it takes a cell like any request"
    );
    assert_eq!(v["quota"]["limit"], 50);
    assert_eq!(v["quota"]["period"], "day");
    assert_eq!(v["quota"]["remaining"], 50, "introspection costs no quota");
    assert!(v["quota"]["reset"].as_u64().unwrap() >= 1);
    let text = r.text();
    assert_no_secrets(
        &text,
        &[&token, &hash, "argon2", "neighbour", "127.0.0.0", "allow"],
    );

    // A real request costs 1; introspection shows it and still costs nothing.
    assert_eq!(
        c.get(&kg.url("/api/x"), &[("x-api-key", &token)])
            .await
            .status,
        200
    );
    for _ in 0..2 {
        let v = c.get(&kg.url(path), &[("x-api-key", &token)]).await.json();
        assert_eq!(v["quota"]["remaining"], 49);
    }
    // Other spellings are answered too (h1 and h2), never forwarded; below it: 404; other
    // methods: 405; no key: 401.
    let h2 = kg.client_h2();
    for p in [
        "/.well-known/keygate/key/",
        "/.well-known/keygate/./key",
        "//.well-known/keygate/key?x=1",
        "/.well-known/keygate/%6bey",
    ] {
        assert_eq!(
            c.get(&kg.url(p), &[("x-api-key", &token)]).await.json()["id"],
            "client-dev",
            "{p}"
        );
        assert_eq!(
            h2.get(&kg.url(p), &[("x-api-key", &token)]).await.status,
            200,
            "{p}"
        );
    }
    assert_eq!(
        c.get(
            &kg.url("/.well-known/keygate/key/x"),
            &[("x-api-key", &token)]
        )
        .await
        .status,
        404
    );
    let r = c.send(req("POST", &kg.url(path), &token)).await;
    assert_eq!((r.status, r.header("allow")), (405, Some("GET, HEAD")));
    assert_eq!(c.get(&kg.url(path), &[]).await.status, 401);
    let v = c.get(&kg.url(path), &[("x-api-key", &other)]).await.json();
    assert_eq!(
        (v["id"].as_str(), v["role"].is_null()),
        (Some("neighbour"), true)
    );
    assert!(v["rate_limit"].is_null());
    assert_eq!(up.count(), 1, "only /api/x reached the upstream");
    assert!(up.requests().iter().all(|s| !s.uri.contains("well-known")));
    assert_no_secrets(&kg.logs(), &[&token, &hash, &other, &other_hash]);

    // Path configurable (the default then goes to the upstream) or turned off.
    let kg2 = Keygate::builder()
        .upstream(&up)
        .raw("[introspection]\npath = \"/_keygate/me\"")
        .key("neighbour", &other_hash, "")
        .start();
    let c2 = kg2.client();
    let v = c2
        .get(&kg2.url("/_keygate/me"), &[("x-api-key", &other)])
        .await
        .json();
    assert_eq!(v["id"], "neighbour");
    let r = c2.get(&kg2.url(path), &[("x-api-key", &other)]).await;
    assert_eq!((r.status, r.text().as_str()), (200, "ok"), "forwarded");
    let kg3 = Keygate::builder()
        .upstream(&up)
        .raw("[introspection]\nenabled = false")
        .key("neighbour", &other_hash, "")
        .start();
    let r = kg3
        .client()
        .get(&kg3.url(path), &[("x-api-key", &other)])
        .await;
    assert_eq!((r.status, r.text().as_str()), (200, "ok"), "off: forwarded");
    assert_eq!(up.count(), 3);
}

fn exposure_config(port: u16, admin: bool) -> KeygateBuilder {
    let (_, hash) = new_key("x");
    let b = Keygate::builder()
        .upstream_url(&format!("http://127.0.0.1:{port}"))
        .key("x", &hash, "");
    if admin { b.admin() } else { b }
}

fn host_addresses_or_fail() -> Vec<std::net::IpAddr> {
    let addrs = keygate::exposure::host_addresses();
    assert!(
        !addrs.is_empty(),
        "this test needs a non-loopback network interface, and this machine has none: the exposure check cannot be shown here"
    );
    addrs
}

/// An upstream listening on all interfaces is reported (start, reload, check, gauge); one on
/// 127.0.0.1 only is not; a remote upstream gets the note that the network must restrict it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exposure_check_both_ways() {
    let addrs = host_addresses_or_fail();
    let everywhere = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
    let port = everywhere.local_addr().unwrap().port();
    let kg = exposure_config(port, true).start();
    let ev = eventually("upstream_exposed", &kg, || {
        kg.events("upstream_exposed").into_iter().next()
    })
    .await;
    assert_eq!(ev["level"], "WARN");
    let addr: SocketAddr = ev["address"].as_str().unwrap().parse().unwrap();
    assert_eq!(addr.port(), port);
    assert!(
        addrs.contains(&addr.ip()) && !addr.ip().is_loopback(),
        "{addr}"
    );
    let metrics = admin_get(&kg, "/metrics").await;
    assert!(metrics.contains("keygate_upstream_exposed 1"), "{metrics}");
    let before = kg.events("upstream_exposed").len();
    kg.signal("HUP");
    eventually("re-check on reload", &kg, || {
        (kg.events("upstream_exposed").len() > before).then_some(())
    })
    .await;
    let (code, out, err) = keygate_cli(&["check"], &kg.config);
    assert_eq!(
        (code, out.trim()),
        (0, "ok"),
        "a warning, not a failure: {err}"
    );
    assert!(err.contains("warning: upstream_exposed"), "{err}");
    assert!(err.contains(&format!(":{port}")), "{err}");
    drop(kg);
    drop(everywhere);

    let loopback = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = loopback.local_addr().unwrap().port();
    let kg = exposure_config(port, true).start();
    eventually("the check ran", &kg, || {
        kg.json_logs().into_iter().find(|v| {
            v["msg"]
                .as_str()
                .is_some_and(|m| m.contains("closed on every other host address"))
        })
    })
    .await;
    assert!(kg.events("upstream_exposed").is_empty(), "{}", kg.logs());
    assert!(
        admin_get(&kg, "/metrics")
            .await
            .contains("keygate_upstream_exposed 0")
    );
    let (code, _, err) = keygate_cli(&["check"], &kg.config);
    assert_eq!(code, 0);
    assert!(!err.contains("upstream_exposed"), "{err}");
    drop(loopback);

    // Not on loopback: nothing to probe from here; check says the network must restrict it.
    let remote = exposure_config(1, false)
        .upstream_url("http://192.0.2.10:8000")
        .config_text();
    let path = kg.dir.path().join("remote.toml");
    std::fs::write(&path, remote).unwrap();
    let (code, _, err) = keygate_cli(&["check"], &path);
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains("is not a plain-HTTP address on loopback"),
        "{err}"
    );
    assert!(err.contains("the network must restrict it"), "{err}");
}
