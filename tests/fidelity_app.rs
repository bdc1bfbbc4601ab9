//! keygate in front of a real application (FastAPI on uvicorn, tests/apps/app.py), driven by real
//! clients (curl, Python httpx and websockets): what an application and its clients see through
//! keygate must be what they would see without it (issue 8 §7).

mod common;

use std::path::PathBuf;

use common::python::{PyApp, client};
use common::*;
use sha2::Digest;

/// keygate in front of the app, one key; returns (keygate, token).
fn keygate_for(app: &PyApp) -> (Keygate, String) {
    let (token, hash) = new_key("app-client");
    let kg = Keygate::builder()
        .upstream_url(&app.url())
        .key("app-client", &hash, "")
        .start();
    (kg, token)
}

fn ca_pem(kg: &Keygate) -> PathBuf {
    kg.dir.path().join("cert.pem")
}

/// curl with keygate's certificate trusted and the key presented.
fn kcurl(kg: &Keygate, token: &str, args: &[&str]) -> (i32, String, String) {
    let ca = ca_pem(kg);
    let hdr = format!("x-api-key: {token}");
    let mut all = vec!["-sS", "--cacert", ca.to_str().unwrap(), "-H", &hdr];
    all.extend_from_slice(args);
    curl(&all)
}

fn vm_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| {
            l.strip_prefix(field)?
                .trim()
                .strip_suffix("kB")?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("{field} in /proc/{pid}/status"))
}

#[test]
fn the_app_sees_the_true_client_address_not_a_forged_one() {
    let app = PyApp::uvicorn();
    let (kg, token) = keygate_for(&app);
    // The client connects from 127.0.0.7 (any 127/8 address is local) and forges X-Forwarded-For.
    for proto in ["--http1.1", "--http2"] {
        let (code, out, err) = kcurl(
            &kg,
            &token,
            &[
                proto,
                "--interface",
                "127.0.0.7",
                "-H",
                "X-Forwarded-For: 203.0.113.66",
                &kg.url("/echo"),
            ],
        );
        assert_eq!(code, 0, "{err}");
        let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|_| panic!("{out}"));
        assert_eq!(v["client"][0], "127.0.0.7", "{proto}: {v}");
        assert!(
            !out.contains("203.0.113.66"),
            "{proto}: forged address: {v}"
        );
    }
    assert_no_secrets(&app.logs(), &[&token]);
    assert_no_secrets(&kg.logs(), &[&token]);
}

#[test]
fn several_set_cookie_fields_all_reach_the_client() {
    let app = PyApp::uvicorn();
    let (kg, token) = keygate_for(&app);
    for proto in ["--http1.1", "--http2"] {
        let (code, out, err) = kcurl(
            &kg,
            &token,
            &[proto, "-D", "-", "-o", "/dev/null", &kg.url("/cookies")],
        );
        assert_eq!(code, 0, "{err}");
        let cookies: Vec<&str> = out
            .lines()
            .filter_map(|l| {
                let (n, v) = l.split_once(':')?;
                n.eq_ignore_ascii_case("set-cookie").then_some(v.trim())
            })
            .collect();
        assert_eq!(cookies.len(), 3, "{proto}:\n{out}");
        assert!(cookies[0].starts_with("session=s1;"), "{cookies:?}");
        assert!(cookies[1].starts_with("theme=dark;"), "{cookies:?}");
        assert!(
            cookies[2].contains("expires=Wed, 21 Oct 2037 07:28:00 GMT"),
            "an Expires date's comma must not split the field: {cookies:?}"
        );
    }
}

#[test]
fn server_sent_events_arrive_as_they_are_sent() {
    let app = PyApp::uvicorn();
    let (kg, token) = keygate_for(&app);
    let hdr = format!("x-api-key: {token}");
    let v = client(
        &ca_pem(&kg),
        "sse",
        &kg.url("/sse?n=4&interval_ms=1000"),
        &["-H", &hdr],
    );
    assert_eq!(v["status"], 200, "{v}");
    let events = v["events"].as_array().unwrap();
    assert_eq!(events.len(), 4, "{v}");
    // Not buffered: each event reached the client before the app even produced the next one
    // (the app waits a second between events; a buffering proxy delivers them all at the end).
    for pair in events.windows(2) {
        let received = pair[0]["received"].as_f64().unwrap();
        let next_sent = pair[1]["sent"].as_f64().unwrap();
        assert!(received < next_sent, "event held back: {v}");
    }
}

/// The websockets client's `ws-echo` against the app's `/ws` through keygate, with the key in
/// `X-API-Key` and these extra arguments: the client's JSON report.
fn ws_echo(kg: &Keygate, token: &str, args: &[&str]) -> serde_json::Value {
    let hdr = format!("x-api-key: {token}");
    let url = format!("wss://localhost:{}/ws", kg.addr.port());
    let mut all = vec!["-H", hdr.as_str()];
    all.extend_from_slice(args);
    client(&ca_pem(kg), "ws-echo", &url, &all)
}

#[test]
fn websocket_echo_through_the_websockets_client() {
    let app = PyApp::uvicorn();
    let (kg, token) = keygate_for(&app);
    let v = ws_echo(&kg, &token, &["--messages", "5", "--size", "10000"]);
    assert_eq!(v["echoed"], 5, "{v}");
    assert_eq!(v["text"], "bye", "{v}");
    assert_no_secrets(&kg.logs(), &[&token]);
    assert_no_secrets(&app.logs(), &[&token]);
}

#[test]
fn range_requests_get_the_bytes_asked_for() {
    let app = PyApp::uvicorn();
    let (kg, token) = keygate_for(&app);
    let byte = |i: usize| (i % 251) as u8;
    for proto in ["--http1.1", "--http2"] {
        let dir = tempfile::tempdir().unwrap();
        let out_file = dir.path().join("part");
        let out_path = out_file.to_str().unwrap();
        // One range.
        let (code, head, err) = kcurl(
            &kg,
            &token,
            &[
                proto,
                "-D",
                "-",
                "-o",
                out_path,
                "-r",
                "1000-1999",
                &kg.url("/file"),
            ],
        );
        assert_eq!(code, 0, "{err}");
        let head = head.to_ascii_lowercase();
        assert!(head.contains(" 206"), "{proto}: {head}");
        assert!(
            head.contains("content-range: bytes 1000-1999/1000000"),
            "{head}"
        );
        let body = std::fs::read(&out_file).unwrap();
        assert_eq!(body.len(), 1000);
        assert!(body.iter().enumerate().all(|(k, b)| *b == byte(1000 + k)));
        // The last 500 bytes.
        let (code, _, err) = kcurl(
            &kg,
            &token,
            &[proto, "-o", out_path, "-r", "-500", &kg.url("/file")],
        );
        assert_eq!(code, 0, "{err}");
        let body = std::fs::read(&out_file).unwrap();
        assert_eq!(body.len(), 500);
        assert!(
            body.iter()
                .enumerate()
                .all(|(k, b)| *b == byte(999_500 + k))
        );
        // Beyond the end: 416 from the app, passed through.
        let (code, status, err) = kcurl(
            &kg,
            &token,
            &[
                proto,
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "-r",
                "2000000-",
                &kg.url("/file"),
            ],
        );
        assert_eq!(code, 0, "{err}");
        assert_eq!(status, "416", "{proto}");
    }
}

#[test]
fn large_multipart_upload_streams_through_without_buffering() {
    let app = PyApp::uvicorn();
    let (kg, token) = keygate_for(&app);
    // 48 MiB of varied bytes, and its digest.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("big.bin");
    let mut data = Vec::with_capacity(48 << 20);
    let mut x: u32 = 0x9e37_79b9;
    while data.len() < 48 << 20 {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        data.extend_from_slice(&x.to_le_bytes());
    }
    std::fs::write(&path, &data).unwrap();
    let want: String = sha2::Sha256::digest(&data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    drop(data);

    let rss_before = vm_kib(kg.pid(), "VmRSS:");
    for proto in ["--http1.1", "--http2"] {
        let form = format!("file=@{}", path.display());
        let (code, out, err) = kcurl(&kg, &token, &[proto, "-F", &form, &kg.url("/upload")]);
        assert_eq!(code, 0, "{err}");
        let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|_| panic!("{out}"));
        assert_eq!(v["size"], 48 << 20, "{proto}: {v}");
        assert_eq!(v["sha256"], want, "{proto}: {v}");
        assert_eq!(v["filename"], "big.bin");
    }
    // keygate streamed the body: its peak memory grew by far less than one body (48 MiB).
    let peak = vm_kib(kg.pid(), "VmHWM:");
    assert!(
        peak < rss_before + 16 * 1024,
        "keygate RSS went from {rss_before} KiB to a peak of {peak} KiB"
    );
}

#[test]
fn a_token_echoed_in_the_query_or_a_cookie_never_reaches_the_app() {
    let app = PyApp::uvicorn();
    let (kg, token) = keygate_for(&app);
    let encoded = token.replace('_', "%5F");
    // The same token as the credential, as two query parameters (one percent-encoded, under
    // another name) and as a cookie; other parameters, even same-named, must pass untouched.
    let query = format!("api_key={token}&q=a%20b+c&api_key=other&mine={encoded}&empty=&flag");
    let cookie = format!("session=abc123; tok={token}; lang=en");
    for proto in ["--http1.1", "--http2"] {
        let url = kg.url(&format!("/echo?{query}"));
        let (code, out, err) = kcurl(
            &kg,
            &token,
            &[proto, "-H", &format!("cookie: {cookie}"), &url],
        );
        assert_eq!(code, 0, "{err}");
        let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|_| panic!("{out}"));
        assert_eq!(
            v["query_string"], "q=a%20b+c&api_key=other&empty=&flag",
            "{proto}: {v}"
        );
        assert_eq!(v["cookies"]["session"], "abc123", "{proto}: {v}");
        assert_eq!(v["cookies"]["lang"], "en", "{proto}: {v}");
        assert!(v["cookies"].get("tok").is_none(), "{proto}: {v}");
        assert!(
            !out.contains(&token) && !out.contains(&encoded),
            "{proto}: {out}"
        );
    }
    // uvicorn logs every request line with its query string: the token is not there.
    let logs = app.wait_logs("GET /echo?q=a%20b+c");
    assert_no_secrets(&logs, &[&token, &encoded]);
    assert_no_secrets(&kg.logs(), &[&token, &encoded]);
    let ev = kg.wait_log("credential_echo", |v| v["event"] == "credential_echo");
    assert!(ev["places"].as_str().unwrap().contains("query"), "{ev}");
}

#[test]
fn a_websocket_session_is_logged_with_its_bytes_when_it_closes() {
    let app = PyApp::uvicorn();
    let (kg, token) = keygate_for(&app);
    let v = ws_echo(
        &kg,
        &token,
        &["--messages", "4", "--size", "20000", "--pause-ms", "300"],
    );
    assert_eq!(v["echoed"], 4, "{v}");
    let line = kg.wait_log("websocket access line", |v| {
        v["msg"] == "request" && v["path"] == "/ws"
    });
    assert_eq!(line["status"], 101, "{line}");
    // 80 000 bytes of payload each way, plus WebSocket framing (and the closing handshake).
    let (bytes_in, bytes_out) = (
        line["bytes_in"].as_u64().unwrap(),
        line["bytes_out"].as_u64().unwrap(),
    );
    assert!((80_000..90_000).contains(&bytes_in), "{line}");
    assert!((80_000..90_000).contains(&bytes_out), "{line}");
    assert!(line["duration_ms"].as_f64().unwrap() >= 1200.0, "{line}");
}
