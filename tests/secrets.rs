//! No secret anywhere (issue 5, part 4): every refusal and error path is driven with unique
//! secrets in every credential position, and none of them may appear in anything keygate
//! prints (stdout and stderr) or in any response body it sends. A panicking task must not take
//! the process down nor print request data.

mod common;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http_body_util::BodyExt;
use hyper::Request;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

/// Mints unique, recognisable secrets and remembers every one of them.
#[derive(Default)]
struct Secrets {
    all: Mutex<Vec<String>>,
}

impl Secrets {
    fn mint(&self, what: &str) -> String {
        let s = format!(
            "S3cr3t{}{:016x}",
            what.replace(|c: char| !c.is_ascii_alphanumeric(), ""),
            rand::random::<u64>()
        );
        self.remember(&s);
        s
    }
    fn remember(&self, s: &str) {
        self.all.lock().unwrap().push(s.to_string());
    }
    /// A well-formed token for `id` (valid checksum) whose secret part is new.
    fn token(&self, id: &str) -> String {
        let t = keygate::auth::NewToken::generate(id).reveal().to_string();
        self.remember(&t);
        // The secret part alone must not leak either.
        self.remember(&t[3 + id.len() + 1..]);
        t
    }
    fn list(&self) -> Vec<String> {
        self.all.lock().unwrap().clone()
    }
}

/// This file's own upstream: `/set-cookie` answers with a secret cookie, `/reset` drops the
/// connection without an answer (502), `/slow` takes two seconds (504), anything else `ok`.
async fn upstream(cookie: String) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let cookie = cookie.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                    let cookie = cookie.clone();
                    async move {
                        let path = req.uri().path().to_string();
                        let _ = req.into_body().collect().await;
                        let mut resp = hyper::Response::builder();
                        match path.as_str() {
                            "/reset" => return Err("reset by test upstream"),
                            "/slow" => tokio::time::sleep(Duration::from_secs(2)).await,
                            "/set-cookie" => {
                                resp = resp.header(
                                    "set-cookie",
                                    format!("session={cookie}; Secure; HttpOnly"),
                                );
                            }
                            _ => {}
                        }
                        Ok(resp.body(full(Bytes::from_static(b"ok"))).unwrap())
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    format!("http://{addr}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_in_logs_or_bodies_on_any_path() {
    let secrets = Arc::new(Secrets::default());
    let upstream_cookie = secrets.mint("setcookie");
    let up = upstream(upstream_cookie.clone()).await;

    let (legit, legit_hash) = new_key("legit");
    let (ipkey, ipkey_hash) = new_key("ipkey");
    let (scoped, scoped_hash) = new_key("scoped");
    let (limited, limited_hash) = new_key("limited");
    let (disabled, disabled_hash) = new_key("old");
    let (expired, expired_hash) = new_key("gone");
    for t in [&legit, &ipkey, &scoped, &limited, &disabled, &expired] {
        secrets.remember(t);
    }
    let kg = Keygate::builder()
        .upstream_url(&up)
        .upstream_line("request_timeout = \"300ms\"")
        .server("max_body_bytes = 1000")
        .server("max_header_bytes = 4096")
        .auth("failed_auth_limit = \"20/min\"")
        .key("legit", &legit_hash, "")
        .key("ipkey", &ipkey_hash, "allow = [\"10.0.0.0/8\"]")
        .key(
            "scoped",
            &scoped_hash,
            "methods = [\"GET\"]\npaths = [\"/only\"]",
        )
        .key(
            "limited",
            &limited_hash,
            "rate_limit = \"1/min\"\nburst = 1",
        )
        .key("old", &disabled_hash, "disabled = true")
        .key("gone", &expired_hash, "expires = 2020-01-01T00:00:00Z")
        .start();

    // A query parameter of the operator's own to redact, added by a reload (the test harness
    // writes the [log] table itself).
    let base_config = std::fs::read_to_string(&kg.config).unwrap();
    assert!(base_config.contains("[log]\n"));
    let config = base_config.replacen(
        "[log]\n",
        "[log]\nredact_query_params = [\"session_ref\"]\n",
        1,
    );
    std::fs::write(&kg.config, &config).unwrap();
    kg.signal("HUP");
    kg.wait_log("reload", |v| v["event"] == "config_reloaded");

    let h1 = kg.client();
    let h2 = kg.client_h2();
    let bodies: Arc<Mutex<Vec<String>>> = Arc::default();
    let statuses: Arc<Mutex<BTreeMap<String, Vec<u16>>>> = Arc::default();

    // One request with a secret in every position that is not the credential under test.
    let send = |label: &'static str,
                method: &'static str,
                path: &'static str,
                credential: Vec<(&'static str, String)>,
                body: Option<Vec<u8>>,
                http2: bool| {
        let s = secrets.clone();
        let (bodies, statuses) = (bodies.clone(), statuses.clone());
        let client = if http2 { &h2 } else { &h1 };
        let url = kg.url(&format!(
            "{path}?api_key={}&token={}&password={}&session_ref={}&page=2",
            s.mint("qapikey"),
            s.mint("qtoken"),
            s.mint("qpassword"),
            s.mint("qcustom")
        ));
        let basic = {
            use base64_lite::encode;
            let user_pass = format!("user:{}", s.mint("basicpass"));
            let b = encode(user_pass.as_bytes());
            s.remember(&b);
            b
        };
        let mut b = Request::builder()
            .method(method)
            .uri(url)
            .header(
                "cookie",
                format!("session={}; csrf={}", s.mint("cookie"), s.mint("csrf")),
            )
            .header(
                "proxy-authorization",
                format!("Basic {}", s.mint("proxyauth")),
            );
        let has_authorization = credential.iter().any(|(n, _)| *n == "authorization");
        if !has_authorization {
            b = b.header("authorization", format!("Basic {basic}"));
        }
        for (n, v) in credential {
            b = b.header(n, v);
        }
        let req = b.body(body.map_or_else(empty, full)).unwrap();
        async move {
            let r = client.send(req).await;
            bodies.lock().unwrap().push(r.text());
            statuses
                .lock()
                .unwrap()
                .entry(label.to_string())
                .or_default()
                .push(r.status);
            r
        }
    };
    let key = |t: &str| vec![("x-api-key", t.to_string())];
    let bearer = |t: &str| vec![("authorization", format!("Bearer {t}"))];

    // Warm the verified cache for the keys whose refusals come after authentication.
    for t in [&legit, &ipkey, &scoped, &limited] {
        let r = send("warm", "GET", "/", key(t), None, false).await;
        assert!(matches!(r.status, 200 | 403), "{}", r.text());
    }
    // The upstream's Set-Cookie passes to the client (its business), never into the log.
    let r = send("set-cookie", "GET", "/set-cookie", key(&legit), None, true).await;
    assert_eq!(r.status, 200);
    assert!(r.header("set-cookie").unwrap().contains(&upstream_cookie));

    // Every 401 reason, with the credential as X-API-Key and as Bearer, over h1 and h2.
    let malformed = |s: &Secrets| {
        let mut t = s.token("legit");
        t.pop();
        t.push('!');
        s.remember(&t);
        t
    };
    for http2 in [false, true] {
        for as_bearer in [false, true] {
            let cred = |t: &str| if as_bearer { bearer(t) } else { key(t) };
            let cases: Vec<(&'static str, Vec<(&'static str, String)>)> = vec![
                ("401 missing", vec![]),
                ("401 malformed", cred(&malformed(&secrets))),
                ("401 malformed", cred(&secrets.mint("notatoken"))),
                ("401 unknown_key", cred(&secrets.token("nobody"))),
                ("401 bad_secret", cred(&secrets.token("legit"))),
                ("401 disabled", cred(&disabled)),
                ("401 expired", cred(&expired)),
            ];
            for (label, c) in cases {
                let r = send(label, "GET", "/", c, None, http2).await;
                assert_eq!(r.status, 401, "{label}");
            }
        }
    }
    for reason in [
        "missing",
        "malformed",
        "unknown_key",
        "bad_secret",
        "disabled",
        "expired",
    ] {
        assert!(
            kg.events("auth_failed")
                .iter()
                .any(|e| e["reason"] == reason),
            "no auth_failed {reason}"
        );
    }

    // 403 by the key's IP allowlist and by its scope.
    let r = send("403 ip", "GET", "/", key(&ipkey), None, false).await;
    assert_eq!(r.status, 403);
    let r = send("403 scope", "POST", "/only", bearer(&scoped), None, true).await;
    assert_eq!(r.status, 403);
    let r = send("403 scope", "GET", "/elsewhere", key(&scoped), None, false).await;
    assert_eq!(r.status, 403);

    // 413, announced and streamed.
    let r = send(
        "413",
        "POST",
        "/",
        key(&legit),
        Some(vec![b'x'; 5000]),
        false,
    )
    .await;
    assert_eq!(r.status, 413);
    let chunks = futures_util::stream::iter((0..10).map(|_| {
        Ok::<_, Box<dyn std::error::Error + Send + Sync>>(hyper::body::Frame::data(Bytes::from(
            vec![1u8; 500],
        )))
    }));
    let streamed = h2
        .send(
            Request::post(kg.url(&format!("/?token={}", secrets.mint("streamtoken"))))
                .header("x-api-key", &legit)
                .header("cookie", format!("s={}", secrets.mint("streamcookie")))
                .body(http_body_util::StreamBody::new(chunks).boxed())
                .unwrap(),
        )
        .await;
    assert_eq!(streamed.status, 413);
    bodies.lock().unwrap().push(streamed.text());

    // 429 by the key's rate limit.
    let r1 = send("429 rate", "GET", "/", key(&limited), None, false).await;
    let r2 = send("429 rate", "GET", "/", bearer(&limited), None, true).await;
    // The burst of 1 went to warming the cache.
    assert_eq!((r1.status, r2.status), (429, 429));
    assert!(r1.header("retry-after").is_some());

    // 431: secrets in the credential headers of an oversized request, both tiers.
    for size in [5000, 20_000] {
        let big = "b".repeat(size);
        let mut c = key(&legit);
        c.push(("x-big", big));
        let r = send("431", "GET", "/", c, None, true).await;
        assert_eq!(r.status, 431);
    }

    // 502 (the upstream drops the connection) and 504 (too slow).
    let r = send("502", "GET", "/reset", key(&legit), None, false).await;
    assert_eq!(r.status, 502);
    let r = send("504", "GET", "/slow", bearer(&legit), None, true).await;
    assert_eq!(r.status, 504);

    // 429 by the failed-authentication throttle: guess until refused without hashing.
    let mut throttled = false;
    for _ in 0..30 {
        let r = send(
            "429 throttle",
            "GET",
            "/",
            key(&secrets.token("legit")),
            None,
            false,
        )
        .await;
        if r.status == 429 {
            throttled = true;
            break;
        }
    }
    assert!(throttled, "failed_auth_limit never throttled");
    kg.wait_log("auth_throttled", |v| v["event"] == "auth_throttled");

    // Failed reloads: broken configs that hold secrets. Each is refused and logged
    // (config_reload_failed) without echoing the file.
    let pasted_token = secrets.token("legit");
    let url_password = secrets.mint("urlpassword");
    let syntax_secret = secrets.mint("syntax");
    let type_secret = secrets.mint("wrongtype");
    let id_token = secrets.token("legit");
    let broken = [
        // A plaintext token pasted where the hash belongs.
        config.replacen(
            &format!("hash = \"{legit_hash}\""),
            &format!("hash = \"{pasted_token}\""),
            1,
        ),
        // A TOML syntax error on a line holding a secret.
        config.replacen(
            "[auth]\n",
            &format!("[auth]\nheader = \"X-API-Key\" {syntax_secret}\n"),
            1,
        ),
        // A string where a number belongs.
        config.replacen(
            "max_body_bytes = 1000",
            &format!("max_body_bytes = \"{type_secret}\""),
            1,
        ),
        // A token pasted as a key id.
        config.replacen("id = \"limited\"", &format!("id = \"{id_token}\""), 1),
        // Credentials in an unusable upstream URL.
        config.replacen(
            &format!("url = \"{up}\""),
            &format!("url = \"http://admin:{url_password}@exa mple.com/\""),
            1,
        ),
    ];
    for (i, text) in broken.iter().enumerate() {
        assert_ne!(text, &config, "broken config {i} did not change anything");
        std::fs::write(&kg.config, text).unwrap();
        kg.signal("HUP");
        let n = i + 1;
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while kg.events("config_reload_failed").len() < n {
            assert!(
                std::time::Instant::now() < deadline,
                "reload {i} did not fail:\n{}",
                kg.logs()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    // Still serving the last good configuration.
    std::fs::write(&kg.config, &config).unwrap();
    let r = send("after reloads", "GET", "/", key(&legit), None, false).await;
    assert_eq!(r.status, 200);

    // Access lines are written when a body ends: the last one is there once this one is.
    kg.access_line(r.header("x-request-id").unwrap());
    // Redaction did its work in the access log.
    assert!(kg.json_logs().iter().any(|v| v["msg"] == "request"
        && v["path"].as_str().unwrap_or("").contains(
            "api_key=REDACTED&token=REDACTED&password=REDACTED&session_ref=REDACTED&page=2"
        )));

    let all = secrets.list();
    let all: Vec<&str> = all.iter().map(String::as_str).collect();
    let logs = kg.logs();
    assert_no_secrets(&logs, &all);
    assert_no_secrets(&bodies.lock().unwrap().join("\n"), &all);
    // The hashes are not secrets in the way tokens are, but have no business in the log.
    assert_no_secrets(&logs, &[&legit_hash, &limited_hash]);
    eprintln!(
        "{} secrets checked against {} log lines and {} response bodies; statuses: {:?}",
        all.len(),
        logs.lines().count(),
        bodies.lock().unwrap().len(),
        statuses.lock().unwrap()
    );
}

/// The child half of [`a_panicking_task_is_logged_without_its_message`]: keygate's logging and
/// panic hook, a request-handling-like task that panics with request data in its message.
#[test]
#[ignore = "run as a child process by a_panicking_task_is_logged_without_its_message"]
fn panic_child() {
    let secret = std::env::var("KEYGATE_PANIC_SECRET").expect("run by the parent test");
    let log = keygate::log::init(true, tracing::Level::INFO);
    keygate::cli::install_panic_hook();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("keygate-worker")
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let task = tokio::spawn(async move {
            // An error that quotes a header value, unwrapped: the default hook would print it.
            let parsed: Result<u8, String> =
                std::hint::black_box(Err(format!("bad X-API-Key: {secret}")));
            parsed.unwrap()
        });
        assert!(task.await.unwrap_err().is_panic());
        let still = tokio::spawn(async { 42 }).await.unwrap();
        tracing::info!(target: "keygate::test", still, "runtime still serving");
    });
    drop(log);
}

/// A panic inside a task (as a connection or request task would) is caught by tokio: the
/// process lives on, and the hook logs `event="panic"` with its location, never the message.
#[test]
fn a_panicking_task_is_logged_without_its_message() {
    let secret = format!("S3cr3tPanic{:016x}", rand::random::<u64>());
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--ignored",
            "--exact",
            "panic_child",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("KEYGATE_PANIC_SECRET", &secret)
        .env("RUST_BACKTRACE", "1")
        .output()
        .unwrap();
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{all}");
    let panic_line = all
        .lines()
        // libtest's "test panic_child ... " may share the line.
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(&l[l.find('{')?..]).ok())
        .find(|v| v["event"] == "panic")
        .unwrap_or_else(|| panic!("no panic event:\n{all}"));
    assert!(
        panic_line["file"].as_str().unwrap().ends_with("secrets.rs"),
        "{panic_line}"
    );
    assert!(panic_line["line"].as_u64().unwrap() > 0);
    assert_eq!(panic_line["thread"], "keygate-worker");
    assert!(all.contains("runtime still serving"), "{all}");
    assert_no_secrets(&all, &[&secret]);
}

/// Base64 for HTTP Basic credentials (the standard alphabet, padded).
mod base64_lite {
    pub fn encode(input: &[u8]) -> String {
        const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut out = String::new();
        for c in input.chunks(3) {
            let n = (u32::from(c[0]) << 16)
                | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
                | u32::from(*c.get(2).unwrap_or(&0));
            for i in 0..4 {
                if i <= c.len() {
                    out.push(T[(n >> (18 - 6 * i)) as usize & 63] as char);
                } else {
                    out.push('=');
                }
            }
        }
        out
    }

    #[test]
    fn rfc4648_vectors() {
        assert_eq!(encode(b"foobar"), "Zm9vYmFy");
        assert_eq!(encode(b"fooba"), "Zm9vYmE=");
        assert_eq!(encode(b"foob"), "Zm9vYg==");
    }
}
