//! Upgraded connections (WebSocket tunnels) lose their access like requests do (fresh user
//! T6-1): a tunnel carries no more requests, so before, a reload that denied its client's
//! network, replaced its client CA or removed its key left it open indefinitely. Now a reload
//! (or the key's expiry instant) that would refuse the upgrade request closes the tunnel: the
//! client gets a WebSocket Close frame with 1008, the upstream one with 1001, `tunnel_closed`
//! is logged with the reason and the access line says `cut_by: revoked`. A reload that changes
//! nothing the upgrade depends on leaves it up. Real WebSocket client (Python `websockets`)
//! through a real WebSocket server (FastAPI on uvicorn), and hand-written frames where the
//! exact bytes matter.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use common::python::{PyApp, apps_dir, python};
use common::raw::Tls;
use common::reload::reload_with;
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The `websockets` client (`clients.py ws-stream`): one message every 100 ms to the app's
/// `/ws` echo through keygate; its report lines as they come.
struct WsClient {
    child: Child,
    lines: mpsc::Receiver<serde_json::Value>,
    echoes: usize,
}

impl WsClient {
    fn start(kg: &Keygate, token: &str, max_s: u32) -> WsClient {
        let url = format!("wss://localhost:{}/ws", kg.addr.port());
        let mut child = Command::new(python())
            .arg(apps_dir().join("clients.py"))
            .args(["ws-stream", &url, "--ca"])
            .arg(kg.dir.path().join("cert.pem"))
            .args(["-H", &format!("x-api-key: {token}")])
            .args(["--pause-ms", "100", "--max-s", &max_s.to_string()])
            .current_dir(apps_dir())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start clients.py");
        let out = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                let v = serde_json::from_str(&line).unwrap_or_else(|_| line.into());
                if tx.send(v).is_err() {
                    break;
                }
            }
        });
        WsClient {
            child,
            lines,
            echoes: 0,
        }
    }

    /// Waits for `n` more echoes; panics with what came instead.
    fn more_echoes(&mut self, n: usize) {
        for _ in 0..n {
            let v = self
                .lines
                .recv_timeout(Duration::from_secs(20))
                .expect("an echo");
            assert!(v["echo"].is_number(), "expected an echo, got {v}");
            self.echoes += 1;
        }
    }

    /// The client's last line (`closed` or `done`), skipping echoes, within `within`.
    fn end(&mut self, within: Duration) -> serde_json::Value {
        let deadline = std::time::Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let v = self
                .lines
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("the WebSocket still open after {within:?}"));
            if !v["echo"].is_number() {
                return v;
            }
            self.echoes += 1;
        }
    }
}

impl Drop for WsClient {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn keygate_for(app: &PyApp, hash: &str) -> KeygateBuilder {
    Keygate::builder()
        .upstream_url(&app.url())
        .key("ws", hash, "")
}

/// The access line of the tunnel of `key_id` (status 101), once written.
fn tunnel_line(kg: &Keygate, key_id: &str) -> serde_json::Value {
    kg.wait_log("tunnel access line", |v| {
        v["msg"] == "request" && v["status"] == 101 && v["key_id"] == key_id
    })
}

/// T6-1: a reload denying the client's network closes its open WebSocket (before: it went on
/// echoing indefinitely). The client sees a Close frame with 1008 (policy violation).
#[test]
fn a_reload_denying_the_clients_network_closes_its_websocket() {
    let app = PyApp::uvicorn();
    let (token, hash) = new_key("ws");
    let kg = keygate_for(&app, &hash).admin().start();
    let mut ws = WsClient::start(&kg, &token, 120);
    ws.more_echoes(3);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let ev = rt.block_on(reload_with(
        &kg,
        &keygate_for(&app, &hash)
            .admin()
            .access(r#"deny = ["127.0.0.1/32"]"#)
            .config_text(),
    ));
    assert_eq!(ev["event"], "config_reloaded", "{ev}");
    let end = ws.end(Duration::from_secs(15));
    assert_eq!(end["closed"]["by_server"], true, "{end}");
    assert_eq!(end["closed"]["code"], 1008, "{end}");
    let ev = kg.wait_log("tunnel_closed", |v| v["event"] == "tunnel_closed");
    assert_eq!(ev["reason"], "ip_denied", "{ev}");
    assert_eq!(ev["key_id"], "ws", "{ev}");
    assert_eq!(ev["clean_close"], true, "{ev}");
    let line = tunnel_line(&kg, "ws");
    assert_eq!(line["completed"], false, "{line}");
    assert_eq!(line["cut_by"], "revoked", "{line}");
    assert_eq!(line["request_id"], ev["request_id"], "{line}");
    assert!(line["bytes_out"].as_u64().unwrap() > 0, "{line}");
    let m = rt.block_on(common::admin::metrics(&kg));
    assert!(
        m.contains("keygate_tunnels_closed_total{reason=\"ip_denied\"} 1"),
        "{m}"
    );
    assert_no_secrets(&kg.logs(), &[&token, &hash]);
}

/// A reload that changes nothing the upgrade request depends on (another network denied,
/// another key added, the tunnel key's rate limit and paths changed but still covering `/ws`)
/// leaves the WebSocket up, and data still flows both ways; it then ends normally.
#[test]
fn a_reload_that_changes_nothing_relevant_keeps_the_websocket() {
    let app = PyApp::uvicorn();
    let (token, hash) = new_key("ws");
    let (_, other) = new_key("other");
    let kg = keygate_for(&app, &hash).start();
    let mut ws = WsClient::start(&kg, &token, 20);
    ws.more_echoes(3);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let changed = Keygate::builder()
        .upstream_url(&app.url())
        .key(
            "ws",
            &hash,
            "rate_limit = \"50/s\"\npaths = [\"/ws\", \"/api\"]",
        )
        .key("other", &other, "")
        .access(r#"deny = ["127.0.19.0/24"]"#)
        .config_text();
    let ev = rt.block_on(reload_with(&kg, &changed));
    assert_eq!(ev["event"], "config_reloaded", "{ev}");
    ws.more_echoes(10);
    let end = ws.end(Duration::from_secs(60));
    assert!(end["done"].is_number(), "{end}");
    assert!(kg.events("tunnel_closed").is_empty(), "{}", kg.logs());
    let line = tunnel_line(&kg, "ws");
    assert_eq!(line["completed"], true, "{line}");
    assert!(line["cut_by"].is_null(), "{line}");
}

/// SIGTERM with a WebSocket open: the tunnel does not hold the drain up (it never ends by
/// itself); it is closed with 1001 (going away), logged `cut_by: shutdown`, and keygate exits 0
/// without waiting for `shutdown_grace`. Before, the process ended under it: no Close frame, no
/// access line.
#[test]
fn a_websocket_open_at_shutdown_is_closed_going_away_and_logged() {
    let app = PyApp::uvicorn();
    let (token, hash) = new_key("ws");
    let mut kg = keygate_for(&app, &hash)
        .server("shutdown_grace = \"60s\"")
        .start();
    let mut ws = WsClient::start(&kg, &token, 120);
    ws.more_echoes(3);
    kg.signal("TERM");
    let end = ws.end(Duration::from_secs(15));
    assert_eq!(end["closed"]["code"], 1001, "{end}");
    assert_eq!(
        kg.wait_exit(Duration::from_secs(15)),
        Some(0),
        "{}",
        kg.logs()
    );
    let line = tunnel_line(&kg, "ws");
    assert_eq!(line["cut_by"], "shutdown", "{line}");
    let ev = kg.events("tunnel_closed");
    assert_eq!(ev.len(), 1, "{}", kg.logs());
    assert_eq!(ev[0]["reason"], "shutdown", "{}", ev[0]);
}

// ---------------------------------------------------------------------------------------------
// Hand-written frames through the test upstream's `/ws` (it switches, then echoes bytes)

/// A masked text frame from a client (RFC 6455 §5.2, §5.3).
fn client_frame(text: &[u8]) -> Vec<u8> {
    let mask = [0x37, 0xfa, 0x21, 0x3d];
    let mut f = vec![0x81, 0x80 | text.len() as u8];
    f.extend_from_slice(&mask);
    f.extend(text.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    f
}

/// Sends a frame and reads its echo back whole.
async fn round_trip(t: &mut Tls, text: &[u8]) {
    let f = client_frame(text);
    t.write_all(&f).await.unwrap();
    let mut back = vec![0u8; f.len()];
    tokio::time::timeout(Duration::from_secs(10), t.read_exact(&mut back))
        .await
        .expect("echo in time")
        .unwrap();
    assert_eq!(back, f);
}

/// What the client reads until keygate closes the connection (bounded).
async fn read_to_close(t: &mut Tls) -> Vec<u8> {
    let mut got = Vec::new();
    let mut buf = [0u8; 256];
    let until = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        match tokio::time::timeout_at(until, t.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return got,
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Err(_) => panic!("still open; read {got:?}"),
        }
    }
}

/// The Close frame keygate sends a client whose access is gone: 1008, no reason.
const CLOSE_1008: [u8; 4] = [0x88, 0x02, 0x03, 0xf0];

/// One reload that removes one key, disables one, narrows one's paths, one's `allow` and
/// replaces one's hash closes each of their tunnels with its reason (on a frame boundary, with
/// the 1008 Close frame and nothing else), and leaves the tunnel of an untouched key up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_taking_a_keys_access_away_closes_its_tunnels() {
    let up = Upstream::start().await;
    let ids = ["gone", "off", "narrow", "fenced", "rekeyed", "stay"];
    let keys: Vec<(String, String)> = ids.iter().map(|id| new_key(id)).collect();
    let (_, new_hash) = new_key("rekeyed");
    let config = |changed: bool| {
        let mut b = Keygate::builder().upstream(&up);
        for (id, (_, hash)) in ids.iter().zip(&keys) {
            let (hash, extra) = match (*id, changed) {
                ("gone", true) => continue,
                ("off", true) => (hash.as_str(), "disabled = true"),
                ("narrow", true) => (hash.as_str(), "paths = [\"/api\"]"),
                ("fenced", true) => (hash.as_str(), "allow = [\"10.0.0.0/8\"]"),
                ("rekeyed", true) => (new_hash.as_str(), ""),
                _ => (hash.as_str(), ""),
            };
            b = b.key(id, hash, extra);
        }
        b
    };
    let kg = config(false).start();
    let mut tunnels = Vec::new();
    for (token, _) in &keys {
        let mut t = kg.open_tunnel("/ws", token).await.expect("tunnel");
        round_trip(&mut t, b"before").await;
        tunnels.push(t);
    }
    let ev = reload_with(&kg, &config(true).config_text()).await;
    assert_eq!(ev["event"], "config_reloaded", "{ev}");
    let reasons = [
        "key_removed",
        "key_disabled",
        "scope_denied",
        "key_ip_denied",
        "key_replaced",
    ];
    for (i, reason) in reasons.iter().enumerate() {
        let got = read_to_close(&mut tunnels[i]).await;
        assert_eq!(got, CLOSE_1008, "{}: {got:?}", ids[i]);
        let ev = kg.wait_log(reason, |v| {
            v["event"] == "tunnel_closed" && v["key_id"] == ids[i]
        });
        assert_eq!(ev["reason"], *reason, "{ev}");
        assert_eq!(tunnel_line(&kg, ids[i])["cut_by"], "revoked");
    }
    round_trip(&mut tunnels[5], b"after").await;
    assert_eq!(kg.events("tunnel_closed").len(), 5, "{}", kg.logs());
    let secrets: Vec<&str> = keys
        .iter()
        .flat_map(|(t, h)| [t.as_str(), h.as_str()])
        .collect();
    assert_no_secrets(&kg.logs(), &secrets);
}

/// A key's expiry instant closes its tunnel without any reload (SPEC §2: an expired key stops
/// working at its expiry instant), like the next request would be refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tunnel_is_closed_at_its_keys_expiry_instant() {
    let up = Upstream::start().await;
    let (token, hash) = new_key("soon");
    let expires = jiff::Timestamp::now() + jiff::SignedDuration::from_secs(3);
    let kg = Keygate::builder()
        .upstream(&up)
        .key("soon", &hash, &format!("expires = \"{expires}\""))
        .start();
    let mut t = kg.open_tunnel("/ws", &token).await.expect("tunnel");
    round_trip(&mut t, b"while valid").await;
    assert_eq!(read_to_close(&mut t).await, CLOSE_1008);
    assert!(jiff::Timestamp::now() >= expires);
    let ev = kg.wait_log("tunnel_closed", |v| v["event"] == "tunnel_closed");
    assert_eq!(ev["reason"], "key_expired", "{ev}");
}

/// Opens a tunnel on `s` with a hand-written upgrade request (and `extra` header lines).
async fn upgrade_on(s: &mut Tls, token: &str, extra: &str) {
    s.write_all(
        format!("GET /ws HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nX-API-Key: {token}\r\n{extra}\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let (status, head, _) = common::raw::read_response(s).await;
    assert_eq!(status, 101, "{head}");
}

/// Behind a trusted proxy the client is the `X-Forwarded-For` address of the upgrade request:
/// a reload denying that client's network closes its tunnel (found again from the same
/// header), and leaves the tunnel of another client through the same proxy up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_a_trusted_proxy_the_forwarded_client_is_checked_again() {
    let up = Upstream::start().await;
    let (token, hash) = new_key("k");
    let base = || {
        Keygate::builder()
            .upstream(&up)
            .access(r#"trusted_proxies = ["127.0.0.0/8"]"#)
            .key("k", &hash, "")
    };
    let kg = base().start();
    let mut denied = kg.tls_stream().await;
    upgrade_on(&mut denied, &token, "X-Forwarded-For: 203.0.113.5\r\n").await;
    let mut other = kg.tls_stream().await;
    upgrade_on(&mut other, &token, "X-Forwarded-For: 198.51.100.7\r\n").await;
    round_trip(&mut denied, b"before").await;
    round_trip(&mut other, b"before").await;
    let denying = base().access(r#"deny = ["203.0.113.0/24"]"#).config_text();
    assert_eq!(reload_with(&kg, &denying).await["event"], "config_reloaded");
    assert_eq!(read_to_close(&mut denied).await, CLOSE_1008);
    let ev = kg.wait_log("tunnel_closed", |v| v["event"] == "tunnel_closed");
    assert_eq!(ev["reason"], "ip_denied", "{ev}");
    assert_eq!(ev["client_ip"], "203.0.113.5", "{ev}");
    round_trip(&mut other, b"after").await;
    assert_eq!(kg.events("tunnel_closed").len(), 1, "{}", kg.logs());
    // Upgrades switched off altogether (`upgrade_protocols = []`): the other one goes too.
    let no_upgrades = base()
        .access(r#"deny = ["203.0.113.0/24"]"#)
        .upstream_line("upgrade_protocols = []")
        .config_text();
    assert_eq!(
        reload_with(&kg, &no_upgrades).await["event"],
        "config_reloaded"
    );
    assert_eq!(read_to_close(&mut other).await, CLOSE_1008);
    let ev = kg.wait_log("second tunnel_closed", |v| {
        v["event"] == "tunnel_closed" && v["client_ip"] == "198.51.100.7"
    });
    assert_eq!(ev["reason"], "upgrade_refused", "{ev}");
}

/// A client CA (PEM) and a client certificate it issued, with its key.
fn client_pki(
    name: &str,
) -> (
    String,
    rustls_pki_types::CertificateDer<'static>,
    rustls_pki_types::PrivateKeyDer<'static>,
) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    p.distinguished_name
        .push(rcgen::DnType::CommonName, format!("{name} client CA"));
    let ca = p.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(p, ca_key);
    let key = rcgen::KeyPair::generate().unwrap();
    let mut cp = rcgen::CertificateParams::new(vec!["client.example".to_string()]).unwrap();
    cp.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let cert = cp.signed_by(&key, &issuer).unwrap();
    let der = rustls_pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into());
    (ca.pem(), cert.der().clone(), der)
}

/// T6-1's second half (T5-11's kind): a reload that replaces `[tls] client_ca` closes the
/// tunnels whose client certificate the new bundle no longer accepts; a bundle that still
/// holds their CA keeps them open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tunnel_whose_client_ca_is_revoked_is_closed() {
    let up = Upstream::start().await;
    let (token, hash) = new_key("k");
    let base = || Keygate::builder().upstream(&up).key("k", &hash, "");
    let kg = base().start();
    let (ca1, cert1, key1) = client_pki("one");
    let (ca2, _, _) = client_pki("two");
    std::fs::write(kg.dir.path().join("ca1.pem"), &ca1).unwrap();
    std::fs::write(kg.dir.path().join("ca2.pem"), &ca2).unwrap();
    std::fs::write(kg.dir.path().join("both.pem"), format!("{ca1}{ca2}")).unwrap();
    let with_ca = |file: &str| {
        base().config_text().replace(
            "key = \"key.pem\"\n",
            &format!("key = \"key.pem\"\nclient_ca = \"{file}\"\n"),
        )
    };
    assert_eq!(
        reload_with(&kg, &with_ca("ca1.pem")).await["event"],
        "config_reloaded"
    );
    let mut roots = rustls::RootCertStore::empty();
    roots.add(kg.ca.clone()).unwrap();
    let mut cfg = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_client_auth_cert(vec![cert1], key1)
        .unwrap();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tcp = tokio::net::TcpStream::connect(kg.addr).await.unwrap();
    let mut t = tokio_rustls::TlsConnector::from(std::sync::Arc::new(cfg))
        .connect(
            rustls_pki_types::ServerName::try_from("localhost").unwrap(),
            tcp,
        )
        .await
        .unwrap();
    upgrade_on(&mut t, &token, "").await;
    round_trip(&mut t, b"verified by ca1").await;
    assert_eq!(
        reload_with(&kg, &with_ca("both.pem")).await["event"],
        "config_reloaded"
    );
    round_trip(&mut t, b"ca1 still in the bundle").await;
    assert!(kg.events("tunnel_closed").is_empty(), "{}", kg.logs());
    assert_eq!(
        reload_with(&kg, &with_ca("ca2.pem")).await["event"],
        "config_reloaded"
    );
    assert_eq!(read_to_close(&mut t).await, CLOSE_1008);
    let ev = kg.wait_log("tunnel_closed", |v| v["event"] == "tunnel_closed");
    assert_eq!(ev["reason"], "client_cert", "{ev}");
}
