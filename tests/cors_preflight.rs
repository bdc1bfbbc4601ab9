//! CORS preflights (fresh user T5-25): with `[auth] cors_preflight = "forward"` a browser's
//! preflight (OPTIONS + Origin + Access-Control-Request-Method, no credential, no body) reaches
//! the upstream without a key, so its CORS middleware answers and the browser sends the real,
//! keyed request; only an allow-list of fields is forwarded (no cookie, no custom header, no
//! identity), the global allow/deny still applies, each client has a preflight budget, and an
//! OPTIONS that is not a preflight still needs a key. Off by default (401, as before). Real
//! FastAPI upstream with Starlette's CORSMiddleware (tests/apps/cors_app.py on uvicorn).

mod common;

use common::python::PyApp;
use common::*;
use http::Request;

const ORIGIN: &str = "https://app.example";

/// A preflight as a browser sends it for `GET path` with an `X-API-Key`, plus `extra` fields.
fn preflight(kg: &Keygate, path: &str, extra: &[(&str, &str)]) -> Request<Body> {
    let mut b = Request::builder()
        .method("OPTIONS")
        .uri(kg.url(path))
        .header("origin", ORIGIN)
        .header("access-control-request-method", "GET")
        .header("access-control-request-headers", "x-api-key");
    for (n, v) in extra {
        b = b.header(*n, *v);
    }
    b.body(empty()).unwrap()
}

/// The requests the application saw (`SEEN {json}` lines of cors_app.py), by method and path.
fn seen(app: &PyApp, method: &str, path: &str) -> Vec<serde_json::Value> {
    app.logs()
        .lines()
        .filter_map(|l| l.strip_prefix("SEEN "))
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["method"] == method && v["path"] == path)
        .collect()
}

fn header_names(v: &serde_json::Value) -> Vec<String> {
    v["headers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h[0].as_str().unwrap().to_string())
        .collect()
}

fn start(app: &PyApp, hash: &str, auth: &[&str]) -> Keygate {
    let mut b = Keygate::builder()
        .upstream_url(&app.url())
        .key("web", hash, "");
    for l in auth {
        b = b.auth(l);
    }
    b.access("trusted_proxies = [\"127.0.0.1/32\"]")
        .access("deny = [\"203.0.113.0/24\"]")
        .start()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_browser_preflight_reaches_the_cors_middleware_and_nothing_else_does() {
    let app = PyApp::serve(&["uvicorn", "cors_app:app"]);
    let (token, hash) = new_key("web");
    let kg = start(&app, &hash, &["cors_preflight = \"forward\""]);
    let c = kg.client();

    // The preflight, with a cookie and a custom field a forged one might carry.
    let r = c
        .send(preflight(
            &kg,
            "/report",
            &[
                ("cookie", "session=COOKIE-SECRET-1"),
                ("x-custom", "CUSTOM-VALUE-1"),
                ("x-keygate-key-id", "admin"),
            ],
        ))
        .await;
    assert_eq!(r.status, 200, "old code: 401 {}", r.text());
    assert_eq!(r.header("access-control-allow-origin"), Some(ORIGIN));
    assert!(
        r.header("access-control-allow-headers")
            .is_some_and(|h| h.to_ascii_lowercase().contains("x-api-key")),
        "{:?}",
        r.headers
    );
    let rid = r.header("x-request-id").unwrap().to_string();
    let line = kg.access_line(&rid);
    assert_eq!(line["key_id"], serde_json::Value::Null);
    assert_eq!(
        (&line["status"], &line["upstream_status"]),
        (&200.into(), &200.into())
    );
    let got = seen(&app, "OPTIONS", "/report");
    assert_eq!(got.len(), 1, "{}", app.logs());
    let names = header_names(&got[0]);
    for want in [
        "origin",
        "access-control-request-method",
        "access-control-request-headers",
    ] {
        assert!(names.iter().any(|n| n == want), "{want}: {names:?}");
    }
    for gone in [
        "cookie",
        "x-custom",
        "x-keygate-key-id",
        "x-api-key",
        "authorization",
    ] {
        assert!(
            !names.iter().any(|n| n == gone),
            "{gone} forwarded: {names:?}"
        );
    }
    assert_no_secrets(&app.logs(), &["COOKIE-SECRET-1", "CUSTOM-VALUE-1"]);

    // Then the real request, with the key, as the browser sends it.
    let real = Request::get(kg.url("/report"))
        .header("origin", ORIGIN)
        .header("x-api-key", &token)
        .body(empty())
        .unwrap();
    let r = c.send(real).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("access-control-allow-origin"), Some(ORIGIN));

    // Over HTTP/2 the same.
    let r = kg.client_h2().send(preflight(&kg, "/report", &[])).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("access-control-allow-origin"), Some(ORIGIN));

    // Not preflights: each needs a key (401), and the application sees none of them.
    let before = seen(&app, "OPTIONS", "/items/1").len();
    let plain = Request::builder()
        .method("OPTIONS")
        .uri(kg.url("/items/1"))
        .body(empty())
        .unwrap();
    assert_eq!(c.send(plain).await.status, 401, "plain OPTIONS");
    let no_acrm = Request::builder()
        .method("OPTIONS")
        .uri(kg.url("/items/1"))
        .header("origin", ORIGIN)
        .body(empty())
        .unwrap();
    assert_eq!(c.send(no_acrm).await.status, 401, "Origin alone");
    let no_origin = Request::builder()
        .method("OPTIONS")
        .uri(kg.url("/items/1"))
        .header("access-control-request-method", "GET")
        .body(empty())
        .unwrap();
    assert_eq!(c.send(no_origin).await.status, 401, "no Origin");
    let with_body = Request::builder()
        .method("OPTIONS")
        .uri(kg.url("/items/1"))
        .header("origin", ORIGIN)
        .header("access-control-request-method", "GET")
        .body(full("hello"))
        .unwrap();
    assert_eq!(c.send(with_body).await.status, 401, "a body");
    let two_origins = Request::builder()
        .method("OPTIONS")
        .uri(kg.url("/items/1"))
        .header("origin", ORIGIN)
        .header("origin", "https://evil.example")
        .header("access-control-request-method", "GET")
        .body(empty())
        .unwrap();
    assert_eq!(c.send(two_origins).await.status, 401, "two Origins");
    let wrong_key = preflight(&kg, "/items/1", &[("x-api-key", &wrong_token("web"))]);
    assert_eq!(
        c.send(wrong_key).await.status,
        401,
        "a credential: authenticated"
    );
    let bearer = preflight(&kg, "/items/1", &[("authorization", "Bearer nope")]);
    assert_eq!(c.send(bearer).await.status, 401);
    assert_eq!(seen(&app, "OPTIONS", "/items/1").len(), before);
    // A preflight that carries a valid key is an ordinary keyed request.
    let keyed = preflight(&kg, "/items/1", &[("x-api-key", &token)]);
    assert_eq!(c.send(keyed).await.status, 200);
    assert_eq!(seen(&app, "OPTIONS", "/items/1").len(), before + 1);

    // The global deny list holds for preflights (client address from a trusted proxy).
    let denied = preflight(&kg, "/report", &[("x-forwarded-for", "203.0.113.5")]);
    assert_eq!(c.send(denied).await.status, 403);
    assert_no_secrets(&kg.logs(), &[&token, "COOKIE-SECRET-1"]);
}

/// Each client has a preflight budget (`cors_preflight_limit`): unauthenticated load on the
/// upstream. Another client is not affected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preflights_have_a_budget_per_client() {
    let app = PyApp::serve(&["uvicorn", "cors_app:app"]);
    let (_token, hash) = new_key("web");
    let kg = start(
        &app,
        &hash,
        &[
            "cors_preflight = \"forward\"",
            "cors_preflight_limit = \"3/min\"",
        ],
    );
    let c = kg.client();
    let from = |ip: &'static str| preflight(&kg, "/report", &[("x-forwarded-for", ip)]);
    for _ in 0..3 {
        assert_eq!(c.send(from("198.51.100.7")).await.status, 200);
    }
    let r = c.send(from("198.51.100.7")).await;
    assert_eq!(r.status, 429);
    assert!(r.header("retry-after").is_some());
    kg.wait_log("cors_preflight_limited", |v| {
        v["event"] == "cors_preflight_limited" && v["client_ip"] == "198.51.100.7"
    });
    assert_eq!(c.send(from("198.51.100.8")).await.status, 200);
    let got = seen(&app, "OPTIONS", "/report");
    assert_eq!(got.len(), 4);
    // The trusted proxy's chain goes on, as for any forwarded request.
    let xff: Vec<&str> = got[3]["headers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|h| h[0] == "x-forwarded-for")
        .map(|h| h[1].as_str().unwrap())
        .collect();
    assert_eq!(xff, ["198.51.100.8, 127.0.0.1"]);
}

/// Off by default: a preflight is a request without a key (401), as before; `check` refuses
/// an unknown value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preflights_need_a_key_unless_the_operator_turns_forwarding_on() {
    let app = PyApp::serve(&["uvicorn", "cors_app:app"]);
    let (_token, hash) = new_key("web");
    let kg = start(&app, &hash, &[]);
    let r = kg.client().send(preflight(&kg, "/report", &[])).await;
    assert_eq!(r.status, 401);
    assert!(seen(&app, "OPTIONS", "/report").is_empty());

    let (_dir, config) = Keygate::builder()
        .key("web", &hash, "")
        .auth("cors_preflight = \"allow\"")
        .config_dir();
    let (code, _, err) = common::cli::keygate_cli(&["check"], &config);
    assert_eq!(code, 1);
    assert!(
        err.contains("auth.cors_preflight: must be \"refuse\" or \"forward\""),
        "{err}"
    );
}
