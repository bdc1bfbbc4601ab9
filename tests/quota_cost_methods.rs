//! No spelling of a method is cheaper than the method (fresh user T5-19): a `[quota_costs]`
//! rule for `GET` prices `HEAD` too, which FastAPI/Starlette (like Flask, Django, Rails) serve
//! with the GET handler, doing the work; a `_method` override in the query costs what the
//! method it names costs. Scopes and webhook `methods` stay literal (a GET-only key or route
//! refuses HEAD): there the literal reading is the safe one. Real FastAPI upstream
//! (tests/apps/cors_app.py on uvicorn), real TLS; usage read from the introspection endpoint.

mod common;

use common::python::PyApp;
use common::*;

/// `quota.used` as the key itself sees it (`GET /.well-known/keygate/key`).
async fn used(kg: &Keygate, token: &str) -> u64 {
    let got = kg
        .client()
        .get(&kg.url("/.well-known/keygate/key"), &[("x-api-key", token)])
        .await;
    assert_eq!(got.status, 200, "{}", got.text());
    got.json()["quota"]["used"].as_u64().unwrap()
}

/// How often the application ran each handler (`GET /runs`, straight to the app).
fn runs(app: &PyApp) -> serde_json::Value {
    let (code, out, err) = curl(&["-s", &format!("{}/runs", app.url())]);
    assert_eq!(code, 0, "{err}");
    serde_json::from_str(&out).unwrap()
}

const COSTS: &str = r#"
[quota_costs]
rules = [
  { methods = ["GET"], path = "/report", cost = 4 },
  { methods = ["POST"], path = "/items", cost = 2 },
  { methods = ["DELETE"], path = "/items", cost = 9 },
]
"#;

/// T5-19: `HEAD /report` cost 1 where `GET /report` cost 4, while the application ran the
/// report for both; `POST /items/1?_method=DELETE` cost POST's 2 while the application deleted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn head_and_method_overrides_cost_what_the_handler_they_reach_costs() {
    let app = PyApp::serve(&["uvicorn", "cors_app:app"]);
    let (token, hash) = new_key("cm1");
    let kg = Keygate::builder()
        .upstream_url(&app.url())
        .key("cm1", &hash, "quota = \"1000/day\"")
        .raw(COSTS)
        .start();
    let c = kg.client();
    let mut before = used(&kg, &token).await;
    let mut cost_of = async |method: &str, path: &str| {
        let r = c.send(req(method, &kg.url(path), &token)).await;
        assert_eq!(r.status, 200, "{method} {path}: {}", r.text());
        let now = used(&kg, &token).await;
        let cost = now - before;
        before = now;
        cost
    };
    assert_eq!(cost_of("GET", "/report").await, 4);
    assert_eq!(
        cost_of("HEAD", "/report").await,
        4,
        "HEAD runs the GET handler (old code: 1)"
    );
    assert_eq!(
        runs(&app)["report"],
        2,
        "the application did the work twice"
    );
    assert_eq!(cost_of("HEAD", "/report?x=1").await, 4);
    assert_eq!(cost_of("POST", "/items/1").await, 2);
    assert_eq!(
        cost_of("POST", "/items/1?_method=DELETE").await,
        9,
        "the application deletes: DELETE's price (old code: 2)"
    );
    assert_eq!(cost_of("POST", "/items/1?_method=%44elete").await, 9);
    assert_eq!(runs(&app)["items DELETE"], 2);
    // Over HTTP/2 the same.
    let h2 = kg.client_h2();
    let r = h2.send(req("HEAD", &kg.url("/report"), &token)).await;
    assert_eq!(r.status, 200);
    assert_eq!(used(&kg, &token).await - before, 4, "HEAD over HTTP/2");
}

/// Scopes are allow-lists and stay literal: a key scoped to `GET` gets 403 for `HEAD` (the
/// application is never reached), as for any method its scope does not name; the built-in
/// `read-only` role names HEAD itself. A webhook route for `GET` answers `HEAD` 405 with its
/// `Allow`, unforwarded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scopes_and_webhook_methods_stay_literal_for_head() {
    let up = Upstream::start().await;
    let (get_only, h1) = new_key("getonly");
    let (ro, h2) = new_key("ro");
    let kg = Keygate::builder()
        .upstream(&up)
        .key("getonly", &h1, "methods = [\"GET\"]")
        .key("ro", &h2, "role = \"read-only\"")
        .raw(
            "[[webhooks]]\nid = \"hook\"\npath = \"/hook\"\nscheme = \"github\"\n\
             secret = { env = \"WH_HEAD\" }\nmethods = [\"GET\", \"POST\"]\n",
        )
        .start_with(&[("WH_HEAD", "a-webhook-secret-for-the-test")], None);
    let c = kg.client();
    assert_eq!(
        c.send(req("GET", &kg.url("/a"), &get_only)).await.status,
        200
    );
    assert_eq!(
        c.send(req("HEAD", &kg.url("/a"), &get_only)).await.status,
        403
    );
    assert_eq!(c.send(req("HEAD", &kg.url("/a"), &ro)).await.status, 200);
    let seen = up.count();
    let r = c.send(req("HEAD", &kg.url("/hook"), "")).await;
    assert_eq!(r.status, 405);
    assert_eq!(r.header("allow"), Some("GET, POST"));
    assert_eq!(up.count(), seen, "nothing forwarded");
}
