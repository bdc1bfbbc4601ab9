//! Protocol upgrades cannot become a tunnel past the checks (issue 8 §1, SPEC §4,
//! docs/access.md "Upgrades"): only `[upstream] upgrade_protocols` pass, `h2c` never does, an
//! upstream's 101 is spliced only for a protocol keygate forwarded, on HTTP/1.1 and HTTP/2.

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::h2raw::{self, RawH2};
use common::*;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// What an upstream saw: (HTTP version, method, path, headers).
type SeenReq = (String, String, String, Vec<(String, String)>);

/// An upstream that honours every `Upgrade` it is offered, as a permissive application server
/// does: `h2c` switches to a real HTTP/2 server on the upgraded connection (hypercorn's
/// default), anything else to an echo. Every request is recorded, HTTP/2 ones included.
struct UpgradingUpstream {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<SeenReq>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for UpgradingUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn record(seen: &Mutex<Vec<SeenReq>>, req: &Request<Incoming>) {
    let headers = req
        .headers()
        .iter()
        .map(|(n, v)| (n.to_string(), String::from_utf8_lossy(v.as_bytes()).into()))
        .collect();
    seen.lock().unwrap().push((
        format!("{:?}", req.version()),
        req.method().to_string(),
        req.uri().path().to_string(),
        headers,
    ));
}

impl UpgradingUpstream {
    async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen: Arc<Mutex<Vec<SeenReq>>> = Arc::default();
        let s = seen.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let s = s.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |mut req: Request<Incoming>| {
                        let s = s.clone();
                        async move {
                            record(&s, &req);
                            let offered = req
                                .headers()
                                .get("upgrade")
                                .and_then(|v| v.to_str().ok())
                                .map(|v| v.split(',').next().unwrap_or("").trim().to_string());
                            let Some(proto) = offered else {
                                return Ok::<_, std::convert::Infallible>(Response::new(full(
                                    "plain answer",
                                )));
                            };
                            let on = hyper::upgrade::on(&mut req);
                            let h2c = proto.eq_ignore_ascii_case("h2c");
                            tokio::spawn(async move {
                                let Ok(up) = on.await else { return };
                                if h2c {
                                    let s2 = s.clone();
                                    let svc = hyper::service::service_fn(move |req| {
                                        record(&s2, &req);
                                        async {
                                            Ok::<_, std::convert::Infallible>(Response::new(full(
                                                "answered over h2c",
                                            )))
                                        }
                                    });
                                    let _ = hyper::server::conn::http2::Builder::new(
                                        TokioExecutor::new(),
                                    )
                                    .serve_connection(up, svc)
                                    .await;
                                } else {
                                    let mut io = TokioIo::new(up);
                                    let (mut r, mut w) = tokio::io::split(&mut io);
                                    let _ = tokio::io::copy(&mut r, &mut w).await;
                                }
                            });
                            Ok(Response::builder()
                                .status(101)
                                .header("connection", "Upgrade")
                                .header("upgrade", proto)
                                .body(empty())
                                .unwrap())
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .with_upgrades()
                        .await;
                });
            }
        });
        UpgradingUpstream { addr, seen, task }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn seen(&self) -> Vec<SeenReq> {
        self.seen.lock().unwrap().clone()
    }
}

/// A rogue upstream: reads a request head and answers `101 Switching Protocols` with
/// `Upgrade: <protocol>` whatever was asked, then echoes.
async fn rogue_upstream(protocol: &'static str) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut head = Vec::new();
                while !head.ends_with(b"\r\n\r\n") {
                    let Ok(b) = s.read_u8().await else { return };
                    head.push(b);
                }
                let resp = format!(
                    "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: {protocol}\r\n\r\n"
                );
                let _ = s.write_all(resp.as_bytes()).await;
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    (addr, task)
}

fn has_header(headers: &[(String, String)], name: &str) -> bool {
    headers.iter().any(|(n, _)| n.eq_ignore_ascii_case(name))
}

/// The attack of issue 8 §1, replayed: a key scoped to `GET /public/` asks for an h2c upgrade
/// on an allowed request, then speaks HTTP/2 through the tunnel to `POST /admin` with a forged
/// identity. keygate forwards no upgrade: the upstream answers the GET as a plain request, the
/// client's HTTP/2 bytes hit keygate's HTTP/1.1 parser and go nowhere, `/admin` is never seen.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_upgrade_smuggling_is_refused() {
    let up = UpgradingUpstream::start().await;
    let (token, hash) = new_key("public");
    let kg = Keygate::builder()
        .upstream_url(&up.url())
        .admin()
        .key(
            "public",
            &hash,
            "methods = [\"GET\"]\npaths = [\"/public/\"]",
        )
        .start();

    let mut s = kg.tls_stream().await;
    s.write_all(
        format!(
            "GET /public/ping HTTP/1.1\r\nHost: localhost\r\nX-API-Key: {token}\r\n\
             Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n\
             HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\nX-Request-Id: smuggle-1\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let (status, head, body) = read_response(&mut s).await;
    assert_eq!(status, 200, "no switch: {head}");
    assert_eq!(body, b"plain answer");

    // The smuggled HTTP/2 request, as the attacker sends it after a 101.
    let attack = async {
        let (mut sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(s)).await?;
        tokio::spawn(conn);
        let req = Request::post("http://localhost/admin/users")
            .header("x-keygate-key-id", "root")
            .body(http_body_util::Full::new(Bytes::from_static(
                b"{\"role\":\"admin\"}",
            )))
            .unwrap();
        let resp = sender.send_request(req).await?;
        let status = resp.status();
        let body = resp.into_body().collect().await?.to_bytes();
        Ok::<_, hyper::Error>((status, body))
    };
    let outcome = tokio::time::timeout(Duration::from_secs(10), attack)
        .await
        .expect("the attack ends within 10 s");
    assert!(outcome.is_err(), "the tunnel answered: {outcome:?}");

    let seen = up.seen();
    assert_eq!(seen.len(), 1, "{seen:?}");
    let (version, method, path, headers) = &seen[0];
    assert_eq!(
        (version.as_str(), method.as_str(), path.as_str()),
        ("HTTP/1.1", "GET", "/public/ping")
    );
    for forbidden in ["upgrade", "http2-settings"] {
        assert!(
            !has_header(headers, forbidden),
            "{forbidden} forwarded: {headers:?}"
        );
    }
    assert!(
        !seen.iter().any(|(_, _, p, _)| p.starts_with("/admin")),
        "{seen:?}"
    );

    let ev = kg.wait_log("upgrade_refused", |v| v["event"] == "upgrade_refused");
    assert_eq!(ev["protocol"], "h2c", "{ev}");
    assert_eq!(ev["reason"], "carries_http", "{ev}");
    assert_eq!(ev["key_id"], "public", "{ev}");
    assert_eq!(ev["request_id"], "smuggle-1", "{ev}");
    assert_eq!(ev["client_ip"], "127.0.0.1", "{ev}");
    assert_eq!(ev["level"], "WARN", "{ev}");
    let metrics = admin_get(&kg, "/metrics").await;
    assert!(
        metrics.contains("keygate_upgrades_refused_total{protocol=\"h2c\"} 1"),
        "{metrics}"
    );
    assert_no_secrets(&kg.logs(), &[&token]);
}

/// The same offer in other spellings and company: case, a version, listed with an allowed
/// protocol, without the `Connection` option, over HTTP/1.0. None switches to HTTP.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_in_any_spelling_is_never_forwarded() {
    let up = UpgradingUpstream::start().await;
    let (kg, token) = Keygate::with_key(&up.url(), "k");
    let cases = [
        ("HTTP/1.1", "H2C", "Upgrade, HTTP2-Settings"),
        ("HTTP/1.1", "h2c, websocket/13", "upgrade"),
        ("HTTP/1.1", "HTTP/2.0", "upgrade"),
        ("HTTP/1.1", "h2c", "keep-alive"),
        ("HTTP/1.0", "h2c", "upgrade"),
    ];
    for (i, (version, upgrade, connection)) in cases.iter().enumerate() {
        let mut s = kg.tls_stream().await;
        s.write_all(
            format!(
                "GET /p{i} {version}\r\nHost: localhost\r\nX-API-Key: {token}\r\nConnection: {connection}\r\n\
                 Upgrade: {upgrade}\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n"
            )
            .as_bytes(),
        )
        .await
        .unwrap();
        let (status, head, _) = read_response(&mut s).await;
        // The websocket alternative is forwarded alone, and the upstream switches to it.
        if upgrade.contains("websocket") {
            assert_eq!(status, 101, "{upgrade}: {head}");
            assert!(
                head.to_ascii_lowercase().contains("upgrade: websocket/13"),
                "{head}"
            );
            echo(&mut s, b"still websocket").await;
        } else {
            assert_eq!(status, 200, "{upgrade}: {head}");
        }
    }
    let seen = up.seen();
    assert_eq!(seen.len(), cases.len(), "{seen:?}");
    for (_, _, path, headers) in &seen {
        assert!(
            !has_header(headers, "http2-settings"),
            "{path}: {headers:?}"
        );
        let upgrade: Vec<_> = headers.iter().filter(|(n, _)| n == "upgrade").collect();
        assert!(
            upgrade.iter().all(|(_, v)| v == "websocket/13"),
            "{path}: {headers:?}"
        );
    }
    assert!(
        seen.iter().all(|(v, ..)| v == "HTTP/1.1"),
        "no h2c stream: {seen:?}"
    );
    // Log lines reach the test through a pipe: wait for all of them.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while kg.events("upgrade_refused").len() < cases.len() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(kg.events("upgrade_refused").len(), cases.len());
}

/// Over HTTP/2 a request with `Upgrade`/`Connection` is malformed (RFC 9113 §8.2.2): the
/// stream is reset and nothing is forwarded. `HTTP2-Settings` alone is dropped as hop-by-hop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_requests_never_carry_an_upgrade() {
    let up = UpgradingUpstream::start().await;
    let (kg, token) = Keygate::with_key(&up.url(), "k");
    let mut h2 = RawH2::connect(&kg).await;
    let authority = format!("localhost:{}", kg.addr.port());
    let base = [
        (":method", "GET"),
        (":scheme", "https"),
        (":authority", authority.as_str()),
        (":path", "/public/ping"),
        ("x-api-key", token.as_str()),
    ];
    let mut id = 1;
    for extra in [
        &[
            ("upgrade", "h2c"),
            ("http2-settings", "AAMAAABkAARAAAAAAAIAAAAA"),
        ][..],
        &[("connection", "upgrade"), ("upgrade", "websocket")][..],
    ] {
        let fields: Vec<_> = base.iter().chain(extra).copied().collect();
        h2.headers(id, &fields, true).await;
        let out = h2.outcome(id).await;
        assert_eq!(out.reset, Some(h2raw::PROTOCOL_ERROR), "{extra:?}: {out:?}");
        id += 2;
    }
    assert!(up.seen().is_empty(), "{:?}", up.seen());

    let fields: Vec<_> = base
        .iter()
        .chain(&[("http2-settings", "AAMAAABkAARAAAAAAAIAAAAA")])
        .copied()
        .collect();
    h2.headers(id, &fields, true).await;
    let out = h2.outcome(id).await;
    assert_eq!(out.indexed_status, Some(200), "{out:?}");
    let seen = up.seen();
    assert_eq!(seen.len(), 1);
    assert!(!has_header(&seen[0].3, "http2-settings"), "{seen:?}");
    assert!(!has_header(&seen[0].3, "upgrade"), "{seen:?}");
}

/// An upstream that answers 101 to a request keygate did not forward as an upgrade, or that
/// switches to a protocol the client did not ask for, is never spliced: 502 and an error log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unrequested_or_foreign_101_is_a_bad_gateway() {
    let (addr, _task) = rogue_upstream("h2c").await;
    let (kg, token) = Keygate::with_key(&format!("http://{addr}"), "k");

    // A plain request (h1 and h2), and a websocket upgrade answered with h2c.
    let got = kg
        .client()
        .get(
            &kg.url("/plain"),
            &[("x-api-key", &token), ("x-request-id", "plain-101")],
        )
        .await;
    assert_eq!(got.status, 502, "{}", got.text());
    assert_eq!(got.json()["error"], "bad gateway");
    let got = kg
        .client_h2()
        .get(&kg.url("/plain"), &[("x-api-key", &token)])
        .await;
    assert_eq!(got.status, 502, "{}", got.text());

    let mut s = kg.tls_stream().await;
    s.write_all(
        format!(
            "GET /ws HTTP/1.1\r\nHost: localhost\r\nX-API-Key: {token}\r\nConnection: Upgrade\r\n\
             Upgrade: websocket\r\nX-Request-Id: foreign-101\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let (status, head, body) = read_response(&mut s).await;
    assert_eq!(status, 502, "{head}");
    assert!(String::from_utf8_lossy(&body).contains("\"request_id\":\"foreign-101\""));

    for id in ["plain-101", "foreign-101"] {
        let ev = kg.wait_log(id, |v| {
            v["event"] == "upstream_error" && v["request_id"] == id
        });
        assert_eq!(ev["kind"], "protocol", "{ev}");
        assert_eq!(ev["level"], "ERROR", "{ev}");
        assert_eq!(ev["protocol"], "h2c", "{ev}");
        assert_eq!(kg.access_line(id)["upstream_status"], 101);
    }
}

/// `upgrade_protocols` extends the allowlist (any case); protocols not on it are dropped from
/// the forwarded request with an `upgrade_refused` event, and the request is answered as a
/// plain one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_allowlisted_protocols_upgrade() {
    let up = UpgradingUpstream::start().await;
    let (token, hash) = new_key("k");
    let kg = Keygate::builder()
        .upstream_url(&up.url())
        .upstream_line("upgrade_protocols = [\"websocket\", \"Sync-Proto\"]")
        .key("k", &hash, "")
        .start();
    for (upgrade, switched) in [
        ("websocket", true),
        ("sync-proto/2", true),
        ("irc", false),
        ("connect-udp", false),
    ] {
        let mut s = kg.tls_stream().await;
        s.write_all(
            format!(
                "GET /tunnel HTTP/1.1\r\nHost: localhost\r\nX-API-Key: {token}\r\nConnection: Upgrade\r\nUpgrade: {upgrade}\r\n\r\n"
            )
            .as_bytes(),
        )
        .await
        .unwrap();
        let (status, head, _) = read_response(&mut s).await;
        if switched {
            assert_eq!(status, 101, "{upgrade}: {head}");
            echo(&mut s, format!("through {upgrade}").as_bytes()).await;
        } else {
            assert_eq!(status, 200, "{upgrade}: {head}");
            let ev = kg.wait_log(upgrade, |v| {
                v["event"] == "upgrade_refused" && v["protocol"] == upgrade
            });
            assert_eq!(ev["reason"], "not_allowed", "{ev}");
        }
    }
    let forwarded: Vec<String> = up
        .seen()
        .iter()
        .map(|(_, _, _, h)| {
            h.iter()
                .find(|(n, _)| n == "upgrade")
                .map_or("-".into(), |(_, v)| v.clone())
        })
        .collect();
    assert_eq!(forwarded, ["websocket", "sync-proto/2", "-", "-"]);
}

/// What docs/access.md says a permitted tunnel may do: the upgrade request is checked like any
/// other (credential, scope, rate limit); after the switch keygate copies bytes and no longer
/// sees requests, so request-shaped bytes pass to the upstream's WebSocket server unchecked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scopes_apply_to_the_upgrade_request_only() {
    let up = Upstream::start().await;
    let (token, hash) = new_key("ws-only");
    let kg = Keygate::builder()
        .upstream(&up)
        .key(
            "ws-only",
            &hash,
            "methods = [\"GET\"]\npaths = [\"/ws\"]\nrate_limit = \"1/min\"\nburst = 1",
        )
        .start();
    let upgrade = |path: &str, key: &str| {
        format!(
            "GET {path} HTTP/1.1\r\nHost: localhost\r\nX-API-Key: {key}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
        )
    };
    // Outside the scope, or without a valid key: no switch.
    let mut s = kg.tls_stream().await;
    s.write_all(upgrade("/admin/ws", &token).as_bytes())
        .await
        .unwrap();
    assert_eq!(read_response(&mut s).await.0, 403);
    let mut s = kg.tls_stream().await;
    s.write_all(upgrade("/ws", "kg_nobody_x").as_bytes())
        .await
        .unwrap();
    assert_eq!(read_response(&mut s).await.0, 401);

    // In scope: switched; what follows is not inspected, and costs no rate limit.
    let mut s = kg.tls_stream().await;
    s.write_all(upgrade("/ws", &token).as_bytes())
        .await
        .unwrap();
    assert_eq!(read_response(&mut s).await.0, 101);
    for _ in 0..3 {
        echo(
            &mut s,
            b"POST /admin/users HTTP/1.1\r\nHost: localhost\r\nX-Keygate-Key-Id: root\r\n\r\n",
        )
        .await;
    }
    // The key's single request is spent: a second upgrade is rate limited.
    let mut s2 = kg.tls_stream().await;
    s2.write_all(upgrade("/ws", &token).as_bytes())
        .await
        .unwrap();
    assert_eq!(read_response(&mut s2).await.0, 429);
    echo(&mut s, b"the open tunnel carries on").await;
    assert_eq!(up.count(), 1, "one upgrade request reached the upstream");
}

/// `check` refuses protocols that would tunnel HTTP, and names the TOML path.
#[test]
fn check_refuses_h2c_in_upgrade_protocols() {
    let kg = Keygate::builder()
        .upstream_line("upgrade_protocols = [\"websocket\", \"H2C\", \"bad proto\"]")
        .upstream_line("host = \"backend\"");
    let (_dir, cfg) = kg.config_dir();
    let (code, _, err) = keygate_cli(&["check"], &cfg);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("upstream.upgrade_protocols[1]: \"H2C\" would tunnel HTTP"),
        "{err}"
    );
    assert!(
        err.contains("upstream.upgrade_protocols[2]: \"bad proto\" is not a protocol name"),
        "{err}"
    );
    assert!(
        err.contains("upstream.host: must be \"client\" or \"upstream\""),
        "{err}"
    );
}

/// Pingora CVE-2026-2833 ("premature Upgrade passthrough"): bytes pipelined after an upgrade
/// request must not be tunnelled unless the upstream really switched. Here the upstream answers
/// the upgrade request with a plain 200, so the next bytes are a new request, checked as such.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_after_an_unanswered_upgrade_are_parsed_as_requests() {
    let up = Upstream::start().await;
    let (token, hash) = new_key("k");
    let kg = Keygate::builder().upstream(&up).key("k", &hash, "").start();
    let mut s = kg.tls_stream().await;
    s.write_all(
        format!(
            "GET /not-ws HTTP/1.1\r\nHost: localhost\r\nX-API-Key: {token}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n\
             GET /admin HTTP/1.1\r\nHost: localhost\r\nX-Keygate-Key-Id: root\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let (status, head, body) = read_response(&mut s).await;
    assert_eq!((status, body.as_slice()), (200, &b"ok"[..]), "{head}");
    let (status, head, _) = read_response(&mut s).await;
    assert_eq!(status, 401, "the pipelined request is checked: {head}");
    let seen = up.requests();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0].uri, "/not-ws");
}
