//! A keygate token sent where it does not belong (a query parameter of any name, a path
//! segment, percent-encoded or not) never reaches a log line: access lines and the security
//! events that carry the request target (`scope_denied`, `webhook_rejected`). Real TLS,
//! HTTP/1.1 and HTTP/2; every byte keygate printed is searched for the token's secret.
//! Other secrets (not keygate tokens) behind secret-bearing parameter names of any spelling
//! (`client_secret`, `X-Amz-Signature`, `refresh_token`, `JSESSIONID`) are redacted too.

mod common;

use common::*;

#[tokio::test]
async fn token_shaped_query_values_and_path_segments_are_redacted_in_every_line() {
    let up = Upstream::start().await;
    let (app, app_hash) = new_key("app");
    let (scoped, scoped_hash) = new_key("scoped");
    let kg = Keygate::builder()
        .upstream(&up)
        .key("app", &app_hash, "")
        .key("scoped", &scoped_hash, "paths = [\"/v1/\"]")
        .raw(
            "[[webhooks]]\nid = \"gh\"\npath = \"/hooks/gh\"\nscheme = \"github\"\nsecret = { env = \"WH_GH\" }\n",
        )
        .start_with(&[("WH_GH", "gh-test-secret-0123456789")], None);
    // The secret part (after `kg_scoped_`): what must appear nowhere.
    let secret = &scoped["kg_scoped_".len()..];
    assert_eq!(secret.len(), 38);
    let encoded = scoped.replace('_', "%5F");
    let half = format!("%6B%67_scoped_{secret}"); // `kg` itself escaped

    let mut sent = 0;
    for (proto, c) in [("h1", kg.client()), ("h2", kg.client_h2())] {
        let mut ids = Vec::new();
        let app_key = [("x-api-key", app.as_str())];
        // The fresh user's four names, an unknown one with the token encoded, the token as a
        // parameter name, inside a longer value, and in a path segment (plain and encoded).
        for pq in [
            format!("/public/x?x-api-key={scoped}"),
            format!("/public/x?access-token={scoped}&page=2"),
            format!("/public/x?bearer={scoped}"),
            format!("/public/x?auth={scoped}"),
            format!("/public/x?whatever={encoded}"),
            format!("/public/x?w={half}"),
            format!("/public/x?{scoped}"),
            format!("/public/x?note=Bearer%20{scoped}"),
            format!("/files/{scoped}/raw"),
            format!("/files/{encoded}"),
        ] {
            let got = c.get(&kg.url(&pq), &app_key).await;
            assert_eq!(got.status, 200, "{proto} {pq}");
            ids.push(got.header("x-request-id").unwrap().to_string());
            sent += 1;
        }
        // Refused before any key: the access line of a 401.
        let got = c
            .get(&kg.url(&format!("/public/x?auth={scoped}")), &[])
            .await;
        assert_eq!(got.status, 401);
        ids.push(got.header("x-request-id").unwrap().to_string());
        // scope_denied logs the path: the scoped key used on a path holding a token.
        let got = c
            .get(
                &kg.url(&format!("/files/{scoped}?x=1")),
                &[("x-api-key", scoped.as_str())],
            )
            .await;
        assert_eq!(got.status, 403, "{proto}: scope");
        let rid = got.header("x-request-id").unwrap().to_string();
        let ev = kg.wait_log("scope_denied", |v| {
            v["event"] == "scope_denied" && v["request_id"] == rid.as_str()
        });
        assert_eq!(ev["path"], "/files/REDACTED", "{proto}: {ev}");
        ids.push(rid);
        // A webhook delivery refused (no signature), a token in its query.
        let got = c
            .send(
                hyper::Request::post(kg.url(&format!("/hooks/gh?bearer={scoped}")))
                    .body(full("{}"))
                    .unwrap(),
            )
            .await;
        assert_eq!(got.status, 401, "{proto}: webhook");
        ids.push(got.header("x-request-id").unwrap().to_string());

        // Every request has its access line, with the token replaced.
        for id in &ids {
            let line = kg.access_line(id);
            let path = line["path"].as_str().unwrap();
            assert!(path.contains("REDACTED"), "{proto}: {line}");
        }
        let line = kg.access_line(&ids[0]);
        assert_eq!(line["path"], "/public/x?x-api-key=REDACTED");
        let line = kg.access_line(&ids[1]);
        assert_eq!(line["path"], "/public/x?access-token=REDACTED&page=2");
        let line = kg.access_line(&ids[8]);
        assert_eq!(line["path"], "/files/REDACTED/raw");
    }
    // The upstream got the requests unchanged (redaction is for logs only).
    assert!(up.count() >= sent);
    let logs = kg.logs();
    assert!(
        !logs.contains(secret),
        "the token's secret is in the output:\n{logs}"
    );
    assert!(!logs.contains(&app["kg_app_".len()..]));
}

/// Secrets that are not keygate tokens, behind names on no exact list (a fresh user found
/// `?client_secret=` logged verbatim): every spelling of a secret-bearing name is redacted,
/// over HTTP/1.1 and HTTP/2, in the access lines of forwarded and refused requests.
#[tokio::test]
async fn secret_bearing_parameter_names_are_redacted_in_any_spelling() {
    let up = Upstream::start().await;
    let (app, app_hash) = new_key("app");
    let kg = Keygate::builder()
        .upstream(&up)
        .key("app", &app_hash, "")
        .start();
    let names = [
        "client_secret",
        "Client-Secret",
        "refresh_token",
        "X-Amz-Signature",
        "X-Amz-Credential",
        "oauth_signature",
        "JSESSIONID",
        "PHPSESSID",
        "passwd",
        "db.password",
        "code",
        "authorization",
        "private_key",
        "client%5Fsecret",
    ];
    let mut secrets = Vec::new();
    for (proto, c) in [("h1", kg.client()), ("h2", kg.client_h2())] {
        for (i, name) in names.iter().enumerate() {
            let secret = format!("Zq{proto}s3cr3t{i}VaLuE{}", 1000 + i);
            let pq = format!("/cb?{name}={secret}&state=keep{i}");
            for key in [Some(app.as_str()), None] {
                let headers: Vec<(&str, &str)> =
                    key.map(|k| ("x-api-key", k)).into_iter().collect();
                let got = c.get(&kg.url(&pq), &headers).await;
                assert_eq!(
                    got.status,
                    if key.is_some() { 200 } else { 401 },
                    "{proto} {pq}"
                );
                let rid = got.header("x-request-id").unwrap().to_string();
                let line = kg.access_line(&rid);
                assert_eq!(
                    line["path"],
                    format!("/cb?{name}=REDACTED&state=keep{i}").as_str(),
                    "{proto}: {line}"
                );
            }
            secrets.push(secret);
        }
    }
    let logs = kg.logs();
    for s in &secrets {
        assert!(!logs.contains(s.as_str()), "{s} is in the output:\n{logs}");
    }
}

/// A URL passed as a query value carries its own query (OAuth's `redirect_uri`, a login's
/// `next`): a secret-bearing name in it, raw or percent-encoded once or twice, redacts the whole
/// value in the access line, forwarded (200) or refused (401), over HTTP/1.1 and HTTP/2; the
/// upstream still receives the request as sent.
#[tokio::test]
async fn secrets_in_nested_queries_are_redacted() {
    let up = Upstream::start().await;
    let (app, app_hash) = new_key("app");
    let kg = Keygate::builder()
        .upstream(&up)
        .key("app", &app_hash, "")
        .start();
    let mut secrets = Vec::new();
    for (proto, c) in [("h1", kg.client()), ("h2", kg.client_h2())] {
        for (i, nested) in [
            "/cb?code={S}",
            "https%3A%2F%2Fapp%2Fcb%3Fstate%3D1%26access_token%3D{S}",
            "https%253A%252F%252Fapp%252Fcb%253Fclient_secret%253D{S}",
            "password={S}",
        ]
        .iter()
        .enumerate()
        {
            let secret = format!("Nq{proto}n3st3d{i}SeCrEt{}", 2000 + i);
            let pq = format!("/login?next={}&page=2", nested.replace("{S}", &secret));
            for key in [Some(app.as_str()), None] {
                let headers: Vec<(&str, &str)> =
                    key.map(|k| ("x-api-key", k)).into_iter().collect();
                let got = c.get(&kg.url(&pq), &headers).await;
                assert_eq!(
                    got.status,
                    if key.is_some() { 200 } else { 401 },
                    "{proto} {pq}"
                );
                let rid = got.header("x-request-id").unwrap().to_string();
                let line = kg.access_line(&rid);
                assert_eq!(
                    line["path"], "/login?next=REDACTED&page=2",
                    "{proto}: {line}"
                );
            }
            secrets.push(secret);
        }
    }
    // Redaction is for the logs only: the application gets its parameters untouched.
    let seen = up.requests();
    assert_eq!(seen.len(), secrets.len());
    for (r, s) in seen.iter().zip(&secrets) {
        assert!(r.uri.contains(s.as_str()), "{}", r.uri);
    }
    let logs = kg.logs();
    for s in &secrets {
        assert!(!logs.contains(s.as_str()), "{s} is in the output:\n{logs}");
    }
}

/// A second fresh user: a keygate token sent as `X-Request-Id` (it is made of the characters a
/// request id may hold) was kept as the request id: logged in every line, echoed to the client
/// and forwarded. A token-shaped id is now replaced by a fresh one, with or without a key,
/// over HTTP/1.1 and HTTP/2; other secret-bearing path parameters (`;jsessionid=`) and nested
/// names (`user[password]`) are redacted too.
#[tokio::test]
async fn a_token_sent_as_the_request_id_is_replaced_and_never_logged() {
    let up = Upstream::start().await;
    let (app, app_hash) = new_key("app");
    let kg = Keygate::builder()
        .upstream(&up)
        .key("app", &app_hash, "")
        .start();
    let secret = &app["kg_app_".len()..];
    for (proto, c) in [("h1", kg.client()), ("h2", kg.client_h2())] {
        for key in [Some(app.as_str()), None] {
            let mut headers = vec![("x-request-id", app.as_str())];
            headers.extend(key.map(|k| ("x-api-key", k)));
            let got = c.get(&kg.url("/rid"), &headers).await;
            assert_eq!(got.status, if key.is_some() { 200 } else { 401 }, "{proto}");
            let rid = got.header("x-request-id").unwrap();
            assert!(!rid.contains(secret), "{proto}: echoed {rid}");
            assert_eq!(rid.len(), 32, "{proto}: a fresh id, {rid}");
        }
        let pq = "/denied;jsessionid=PATHSESS1/x?user[password]=L1&user%5Bpassword%5D=L2&keep=1";
        let got = c.get(&kg.url(pq), &[("x-api-key", app.as_str())]).await;
        assert_eq!(got.status, 200, "{proto}");
        let rid = got.header("x-request-id").unwrap().to_string();
        let line = kg.access_line(&rid);
        assert_eq!(
            line["path"],
            "/denied;jsessionid=REDACTED/x?user[password]=REDACTED&user%5Bpassword%5D=REDACTED&keep=1",
            "{proto}"
        );
    }
    for seen in up.seen.lock().unwrap().iter() {
        if let Some(rid) = seen.header("x-request-id") {
            assert!(!rid.contains(secret), "forwarded {rid}");
        }
    }
    let logs = kg.logs();
    for s in [secret, "PATHSESS1", "=L1", "=L2"] {
        assert!(!logs.contains(s), "{s} is in the output:\n{logs}");
    }
}
