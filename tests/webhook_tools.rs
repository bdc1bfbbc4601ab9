//! Operating signed webhook routes (issue 13): `keygate check` and reload refuse a route that
//! would hide the introspection endpoint, and `keygate webhook sign` gives an operator the
//! headers to test a route with curl.

mod common;

use std::process::{Command, Stdio};

use common::webhooks::*;
use common::*;

/// Runs the keygate binary with `env`; returns (exit code, stdout, stderr).
fn keygate(args: &[&str], env: &[(&str, &str)], stdin: &[u8]) -> (i32, String, String) {
    use std::io::Write as _;
    let mut child = Command::new(env!("CARGO_BIN_EXE_keygate"))
        .args(args)
        .env_remove("CREDENTIALS_DIRECTORY")
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // A command that refuses before reading stdin closes it: a broken pipe here is fine.
    let _ = child.stdin.take().unwrap().write_all(stdin);
    let out = child.wait_with_output().unwrap();
    captured(out)
}

fn route(path: &str) -> String {
    format!(
        "[[webhooks]]\nid = \"hook\"\npath = \"{path}\"\nscheme = \"github\"\nsecret = {{ env = \"WH_SECRET\" }}\n"
    )
}

/// Webhook routes are matched before API-key authentication, so a route over the introspection
/// endpoint would hand its path to whoever can sign (or to nobody). Every way of sharing a
/// request path with it is refused, by TOML path, at check and at reload.
#[tokio::test]
async fn a_webhook_route_may_not_share_a_path_with_the_introspection_endpoint() {
    let (_, hash) = new_key("app");
    let env = [("WH_SECRET", "not-printed-8c1f2a")];
    let check = |introspection: &str, path: &str| {
        let b = Keygate::builder()
            .key("app", &hash, "")
            .raw(introspection)
            .raw(&route(path));
        let (_dir, config) = b.config_dir();
        keygate(&["check", "-c", config.to_str().unwrap()], &env, b"")
    };
    for (introspection, path) in [
        ("", "/.well-known/keygate/key"),
        ("", "/.well-known/keygate/key/"),
        ("", "/.well-known/keygate/key/deliveries"),
        ("", "/.well-known/keygate/key/in/"),
        ("", "/.well-known/keygate/"),
        ("", "/.well-known/"),
        ("", "/"),
        ("[introspection]\npath = \"/me\"", "/me"),
        ("[introspection]\npath = \"/me/\"", "/me/hooks/"),
    ] {
        let (code, out, err) = check(introspection, path);
        assert_eq!(code, 1, "{path} with {introspection:?}: {out}{err}");
        assert!(
            err.contains("webhooks[0].path") && err.contains("introspection"),
            "{path}: {err}"
        );
        assert!(!err.contains("not-printed-8c1f2a"), "{err}");
    }
    for (introspection, path) in [
        ("", "/.well-known/keygate"),
        ("", "/.well-known/keygate/keys"),
        ("", "/hooks/"),
        (
            "[introspection]\npath = \"/me\"",
            "/.well-known/keygate/key",
        ),
        ("[introspection]\nenabled = false", "/.well-known/"),
    ] {
        let (code, out, err) = check(introspection, path);
        assert_eq!(
            (code, out.trim()),
            (0, "ok"),
            "{path} with {introspection:?}: {err}"
        );
    }

    // Reload: refused, logged, and the old routes keep serving.
    let up = RecordingUpstream::start().await;
    let kg = Keygate::builder()
        .upstream_url(&up.url())
        .key("app", &hash, "")
        .raw(&route("/hooks/gh"))
        .start_with(&env, None);
    let config = std::fs::read_to_string(&kg.config).unwrap();
    std::fs::write(
        &kg.config,
        config.replace("\"/hooks/gh\"", "\"/.well-known/keygate/\""),
    )
    .unwrap();
    kg.signal("HUP");
    let failed = kg.wait_log("reload refused", |v| v["event"] == "config_reload_failed");
    assert!(failed.to_string().contains("webhooks[0].path"), "{failed}");
    let body = b"{\"ok\":true}";
    let headers = sign_github("not-printed-8c1f2a", body, "d-1");
    let got = kg
        .client()
        .send(post(&kg.url("/hooks/gh"), &headers, body))
        .await;
    assert_eq!(got.status, 200, "{}", got.text());
    assert_eq!(up.count(), 1);
    assert_no_secrets(&kg.logs(), &["not-printed-8c1f2a"]);
}

/// One secret per scheme, per run; a second one for rotation on the svix-style route.
struct Secrets(Vec<(&'static str, String)>);

impl Secrets {
    fn new() -> Self {
        Secrets(vec![
            ("SIGN_HEX", unique_secret("hexsecret")),
            ("SIGN_GH", unique_secret("ghsecret")),
            ("SIGN_STRIPE", unique_secret("whsec_stripe")),
            ("SIGN_STD", random_whsec(32)),
            ("SIGN_SVIX_OLD", random_whsec(32)),
            ("SIGN_SVIX_NEW", random_whsec(32)),
        ])
    }
    fn env(&self) -> Vec<(&str, &str)> {
        self.0.iter().map(|(k, v)| (*k, v.as_str())).collect()
    }
    fn values(&self) -> Vec<String> {
        let mut v: Vec<String> = self.0.iter().map(|(_, s)| s.clone()).collect();
        v.extend(
            self.0
                .iter()
                .filter_map(|(_, s)| s.strip_prefix("whsec_").map(str::to_string)),
        );
        v
    }
}

const SIGN_ROUTES: &str = r#"
[[webhooks]]
id = "plain"
path = "/hooks/plain"
scheme = "hmac-sha256-hex"
header = "X-Signature"
secret = { env = "SIGN_HEX" }
id_from = { header = "X-Delivery-Id" }

[[webhooks]]
id = "gh"
path = "/hooks/gh"
scheme = "github"
secret = { env = "SIGN_GH" }

[[webhooks]]
id = "pay"
path = "/hooks/pay/"
scheme = "stripe"
secret = { env = "SIGN_STRIPE" }

[[webhooks]]
id = "std"
path = "/hooks/std"
scheme = "standard-webhooks"
secret = { env = "SIGN_STD" }

[[webhooks]]
id = "svix"
path = "/hooks/svix"
scheme = "standard-webhooks"
header = "svix-signature"
secrets = [{ env = "SIGN_SVIX_OLD" }, { env = "SIGN_SVIX_NEW" }]
"#;

/// A body that survives only a byte-for-byte path: odd spacing, escapes, non-ASCII, a NUL, CRLF.
fn body(n: u32) -> Vec<u8> {
    let mut b = format!(
        "{{ \"id\" : \"evt_{n}_{:x}\",\r\n \"a\":\"caf\\u00e9 ☕\", \"n\": 1.0e0 }}",
        rand::random::<u32>()
    )
    .into_bytes();
    b.push(0);
    b.extend_from_slice(b"\xff\n");
    b
}

/// The operator's workflow from docs/webhooks.md: `keygate webhook sign … --plain > headers`,
/// then `curl --data-binary @body -H @headers` through a running keygate; and the default
/// `-H '…'` output pasted into a shell command line. Every scheme reaches the upstream byte for
/// byte; a tampered body is refused 401; an unknown route, a secret index out of range and an
/// oversized body exit 1 with a message; no output holds a secret.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_sign_output_sent_with_curl_reaches_the_upstream_byte_for_byte() {
    let up = RecordingUpstream::start().await;
    let s = Secrets::new();
    let (_, hash) = new_key("app");
    let kg = Keygate::builder()
        .upstream_url(&up.url())
        .key("app", &hash, "")
        .raw(SIGN_ROUTES)
        .raw("[[webhooks]]\nid = \"small\"\npath = \"/hooks/small\"\nscheme = \"github\"\nsecret = { env = \"SIGN_GH\" }\nmax_body_bytes = 16")
        .start_with(&s.env(), None);
    let dir = kg.dir.path();
    let config = kg.config.to_str().unwrap().to_string();
    let cacert = dir.join("cert.pem").to_str().unwrap().to_string();
    let mut printed = String::new();
    let sign = |args: &[&str], stdin: &[u8]| {
        let mut all = vec!["webhook", "sign", "-c", config.as_str()];
        all.extend_from_slice(args);
        tokio::task::block_in_place(|| keygate(&all, &s.env(), stdin))
    };
    let curl_post = |path: &str, body_file: &str, headers_file: &str| {
        let url = kg.url(path);
        let data = format!("@{body_file}");
        let hdrs = format!("@{headers_file}");
        let (code, out, err) = tokio::task::block_in_place(|| {
            curl(&[
                "-sS",
                "--cacert",
                &cacert,
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "--data-binary",
                &data,
                "-H",
                &hdrs,
                &url,
            ])
        });
        assert_eq!(code, 0, "{err}");
        out
    };

    for (n, (route, path, expect_headers)) in [
        (
            "plain",
            "/hooks/plain",
            &["x-signature", "x-delivery-id"][..],
        ),
        (
            "gh",
            "/hooks/gh",
            &["x-hub-signature-256", "x-github-delivery"][..],
        ),
        ("pay", "/hooks/pay/events", &["stripe-signature"][..]),
        (
            "std",
            "/hooks/std",
            &["webhook-id", "webhook-timestamp", "webhook-signature"][..],
        ),
        (
            "svix",
            "/hooks/svix",
            &["svix-id", "svix-timestamp", "svix-signature"][..],
        ),
    ]
    .into_iter()
    .enumerate()
    {
        let b = body(n as u32);
        let body_file = dir.join(format!("body-{route}"));
        std::fs::write(&body_file, &b).unwrap();
        let (code, out, err) = sign(&["--route", route, "--plain"], &b);
        assert_eq!(code, 0, "{route}: {err}");
        printed.push_str(&out);
        printed.push_str(&err);
        let names: Vec<&str> = out.lines().map(|l| l.split_once(": ").unwrap().0).collect();
        assert_eq!(names, expect_headers, "{route}: {out}");
        let headers_file = dir.join(format!("headers-{route}"));
        std::fs::write(&headers_file, &out).unwrap();
        let before = up.count();
        let status = curl_post(
            path,
            body_file.to_str().unwrap(),
            headers_file.to_str().unwrap(),
        );
        assert_eq!(status, "200", "{route}:\n{out}\n{}", kg.logs());
        assert_eq!(up.count(), before + 1);
        let d = up.deliveries().pop().unwrap();
        assert_eq!(d.body, b, "{route}: the upstream got other bytes");
        assert_eq!(d.headers.get("x-keygate-webhook").unwrap(), route);

        // The same headers with one byte of the body changed: 401, nothing forwarded.
        let mut tampered = b.clone();
        tampered[5] ^= 1;
        let tampered_file = dir.join(format!("tampered-{route}"));
        std::fs::write(&tampered_file, &tampered).unwrap();
        let status = curl_post(
            path,
            tampered_file.to_str().unwrap(),
            headers_file.to_str().unwrap(),
        );
        assert_eq!(status, "401", "{route}");
        assert_eq!(
            up.count(),
            before + 1,
            "{route}: a tampered body reached the upstream"
        );
        kg.wait_log("bad_signature", |v| {
            v["event"] == "webhook_rejected"
                && v["route"] == route
                && v["reason"] == "bad_signature"
        });
    }

    // The default output is shell words: pasted into a command line (here through eval).
    let b = body(7);
    let body_file = dir.join("body-eval");
    std::fs::write(&body_file, &b).unwrap();
    let (code, out, err) = sign(
        &["--route", "svix", "--secret-index", "1", "--id", "it's-1"],
        &b,
    );
    assert_eq!(code, 0, "{err}");
    printed.push_str(&out);
    assert!(out.lines().all(|l| l.starts_with("-H '")), "{out}");
    let script = format!(
        "curl -sS --cacert '{cacert}' -o /dev/null -w '%{{http_code}}' --data-binary @'{}' {} '{}'",
        body_file.display(),
        out.lines().collect::<Vec<_>>().join(" "),
        kg.url("/hooks/svix")
    );
    let sh =
        tokio::task::block_in_place(|| Command::new("sh").args(["-c", &script]).output().unwrap());
    assert_eq!(
        String::from_utf8_lossy(&sh.stdout),
        "200",
        "{script}\n{}",
        String::from_utf8_lossy(&sh.stderr)
    );
    let d = up.deliveries().pop().unwrap();
    assert_eq!(d.body, b);
    assert_eq!(d.headers.get("svix-id").unwrap(), "it's-1");

    // The same delivery id again: answered by keygate (duplicate of an accepted delivery).
    let before = up.count();
    let (_, again, _) = sign(&["--route", "svix", "--id", "it's-1", "--plain"], &b);
    let headers_file = dir.join("headers-again");
    std::fs::write(&headers_file, &again).unwrap();
    let status = curl_post(
        "/hooks/svix",
        body_file.to_str().unwrap(),
        headers_file.to_str().unwrap(),
    );
    assert_eq!((status.as_str(), up.count()), ("200", before));

    // An old --timestamp: refused as stale (the signature itself is right).
    let (_, old, _) = sign(
        &[
            "--route",
            "pay",
            "--plain",
            "--timestamp",
            &(now() - 3600).to_string(),
        ],
        &b,
    );
    std::fs::write(&headers_file, &old).unwrap();
    let status = curl_post(
        "/hooks/pay/x",
        body_file.to_str().unwrap(),
        headers_file.to_str().unwrap(),
    );
    assert_eq!(status, "401");
    kg.wait_log("stale", |v| {
        v["event"] == "webhook_rejected" && v["reason"] == "stale"
    });

    // Refusals of the command itself: exit 1, a message, nothing on stdout.
    for (args, stdin, expect) in [
        (
            &["--route", "nope"][..],
            &b"{}"[..],
            "no webhook route with id \"nope\"",
        ),
        (
            &["--route", "svix", "--secret-index", "2"][..],
            &b"{}"[..],
            "has 2 secrets (0 to 1)",
        ),
        (
            &["--route", "small"][..],
            &[b'x'; 17][..],
            "over the route's max_body_bytes (16)",
        ),
    ] {
        let (code, out, err) = sign(args, stdin);
        assert_eq!(code, 1, "{args:?}: {out}{err}");
        assert!(err.contains(expect), "{args:?}: {err}");
        assert!(out.is_empty(), "{args:?}: {out}");
        printed.push_str(&err);
    }
    let (_, _, err) = sign(&["--route", "nope"], b"");
    assert!(
        err.contains("routes: plain, gh, pay, std, svix, small"),
        "{err}"
    );
    // A route whose secret is not set: named by TOML path, exit 1.
    let (code, _, err) = tokio::task::block_in_place(|| {
        keygate(
            &["webhook", "sign", "-c", &config, "--route", "gh"],
            &[],
            b"{}",
        )
    });
    assert_eq!(code, 1);
    assert!(
        err.contains("webhooks[1].secret") && err.contains("SIGN_GH"),
        "{err}"
    );

    let (code, help, _) = keygate(&["webhook", "sign", "--help"], &[], b"");
    assert_eq!(code, 0);
    for word in [
        "--route",
        "--secret-index",
        "--plain",
        "curl -H @FILE",
        "docs/webhooks.md",
    ] {
        assert!(help.contains(word), "{word}: {help}");
    }

    let secrets = s.values();
    let secrets: Vec<&str> = secrets.iter().map(String::as_str).collect();
    assert_no_secrets(&printed, &secrets);
    assert_no_secrets(&kg.logs(), &secrets);
}

/// Duplicate detection lasts `dedupe_window` (default 24 h), not `tolerance`: a GitHub route
/// (no timestamp) with a 1 s tolerance still answers a re-sent accepted delivery itself after
/// the tolerance has passed; a route with `dedupe_window = "1s"` forwards it again once the
/// window is over. A window shorter than a timestamped scheme's tolerance is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicates_are_remembered_for_the_dedupe_window_not_the_tolerance() {
    let up = RecordingUpstream::start().await;
    let (_, hash) = new_key("app");
    let secret = format!("dedupe-{:016x}", rand::random::<u64>());
    let routes = "[[webhooks]]\nid = \"long\"\npath = \"/hooks/long\"\nscheme = \"github\"\nsecret = { env = \"DEDUPE_SECRET\" }\ntolerance = \"1s\"\n\n\
                  [[webhooks]]\nid = \"short\"\npath = \"/hooks/short\"\nscheme = \"github\"\nsecret = { env = \"DEDUPE_SECRET\" }\ndedupe_window = \"1s\"\n";
    let env = [("DEDUPE_SECRET", secret.as_str())];
    let kg = Keygate::builder()
        .upstream_url(&up.url())
        .key("app", &hash, "")
        .raw(routes)
        .start_with(&env, None);
    let c = kg.client();
    let body = b"{\"action\":\"opened\"}";
    let send = |path: &'static str, delivery: &'static str| {
        let headers = sign_github(&secret, body, delivery);
        c.send(post(&kg.url(path), &headers, body))
    };
    assert_eq!(send("/hooks/long", "d-long").await.status, 200);
    assert_eq!(send("/hooks/short", "d-short").await.status, 200);
    assert_eq!(up.count(), 2);
    tokio::time::sleep(std::time::Duration::from_millis(2500)).await;
    let again = send("/hooks/long", "d-long").await;
    assert_eq!(again.status, 200);
    assert_eq!(again.json()["status"], "duplicate");
    assert_eq!(
        up.count(),
        2,
        "a duplicate within dedupe_window was forwarded"
    );
    let again = send("/hooks/short", "d-short").await;
    assert_eq!(again.text(), "upstream says hi");
    assert_eq!(
        up.count(),
        3,
        "past dedupe_window the delivery is new again"
    );

    // check: a window shorter than the tolerance of a timestamped scheme; nonsense values.
    for (extra, field, expect) in [
        (
            "scheme = \"stripe\"\ndedupe_window = \"1m\"",
            "webhooks[0].dedupe_window",
            "at least the tolerance",
        ),
        (
            "scheme = \"github\"\ndedupe_window = \"0s\"",
            "webhooks[0].dedupe_window",
            "at least 1s",
        ),
        (
            "scheme = \"github\"\ndedupe_max_ids = 0",
            "webhooks[0].dedupe_max_ids",
            "between 1 and",
        ),
        // Held whole out of the webhooks' 32 MiB share of the request-buffer budget: a larger
        // one would be 503 on every retry (a fresh user's 70 MB delivery).
        (
            "scheme = \"github\"\nmax_body_bytes = 104857600",
            "webhooks[0].max_body_bytes",
            "must be at most 33554432",
        ),
    ] {
        let b = Keygate::builder().key("app", &hash, "").raw(&format!(
            "[[webhooks]]\nid = \"w\"\npath = \"/w\"\nsecret = {{ env = \"DEDUPE_SECRET\" }}\n{extra}\n"
        ));
        let (_dir, config) = b.config_dir();
        let (code, _, err) = keygate(&["check", "-c", config.to_str().unwrap()], &env, b"");
        assert_eq!(code, 1, "{extra}");
        assert!(
            err.contains(field) && err.contains(expect),
            "{extra}: {err}"
        );
    }
    let b = Keygate::builder().key("app", &hash, "").raw(
        "[[webhooks]]\nid = \"w\"\npath = \"/w\"\nscheme = \"stripe\"\nsecret = { env = \"DEDUPE_SECRET\" }\ndedupe_window = \"72h\"\ndedupe_max_ids = 500000\n",
    );
    let (_dir, config) = b.config_dir();
    let (code, out, err) = keygate(&["check", "-c", config.to_str().unwrap()], &env, b"");
    assert_eq!((code, out.trim()), (0, "ok"), "{err}");
}

/// `forward_signature = false`: the verified signature header, and any look-alike spelling of
/// it, is removed before forwarding; the Standard Webhooks id and timestamp stay. By default
/// the signature goes on (tests/webhooks.rs).
#[tokio::test]
async fn forward_signature_false_removes_the_signature_and_its_look_alikes() {
    let up = RecordingUpstream::start().await;
    let (_, hash) = new_key("app");
    let secret = {
        use base64::Engine as _;
        format!(
            "whsec_{}",
            base64::engine::general_purpose::STANDARD.encode(rand::random::<[u8; 32]>())
        )
    };
    let kg = Keygate::builder()
        .upstream_url(&up.url())
        .key("app", &hash, "")
        .raw("[[webhooks]]\nid = \"std\"\npath = \"/hooks/std\"\nscheme = \"standard-webhooks\"\nsecret = { env = \"FWD_SECRET\" }\nforward_signature = false\n")
        .start_with(&[("FWD_SECRET", secret.as_str())], None);
    let body = b"{\"type\":\"x\"}";
    let mut headers = sign_standard(&secret, body, "msg_fwd", now());
    headers.push(("webhook_signature".into(), "v1,bG9vay1hbGlrZQ==".into()));
    headers.push(("Webhook.Signature".into(), "v1,bG9vay1hbGlrZQ==".into()));
    for client in [kg.client(), kg.client_h2()] {
        let id = format!("msg_fwd_{}", rand::random::<u32>());
        let mut headers = headers.clone();
        headers[..3].clone_from_slice(&sign_standard(&secret, body, &id, now()));
        let got = client
            .send(post(&kg.url("/hooks/std"), &headers, body))
            .await;
        assert_eq!(got.status, 200, "{}", got.text());
        let d = up.deliveries().pop().unwrap();
        assert_eq!(d.body, &body[..]);
        for gone in [
            "webhook-signature",
            "webhook_signature",
            "webhook.signature",
        ] {
            assert!(!d.headers.contains_key(gone), "{gone}: {:?}", d.headers);
        }
        assert_eq!(d.headers.get("webhook-id").unwrap(), id.as_str());
        assert!(d.headers.contains_key("webhook-timestamp"));
    }
}
