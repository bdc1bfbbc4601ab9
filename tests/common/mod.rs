//! Test harness: a real keygate process (the built binary) in front of a real in-process
//! upstream, on loopback ports, with certificates made by rcgen at test time, and real TLS
//! clients (hyper over rustls). Nothing is mocked.
#![allow(dead_code)]

pub mod admin;
pub mod cli;
pub mod h2client;
pub mod h2raw;
pub mod python;
pub mod raw;
pub mod redis;
pub mod reload;

// Each test binary uses some of these; the rest are not unused code.
#[allow(unused_imports)]
pub use admin::*;
#[allow(unused_imports)]
pub use cli::*;
#[allow(unused_imports)]
pub use raw::*;
#[allow(unused_imports)]
pub use reload::*;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls_pki_types::CertificateDer;
use tokio::net::TcpListener;

pub mod webhooks;

pub type Body = BoxBody<Bytes, Box<dyn std::error::Error + Send + Sync>>;

pub fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).map_err(|e| match e {}).boxed()
}

pub fn empty() -> Body {
    full(Bytes::new())
}

/// A fresh key: (token, cheap argon2id hash). Cheap parameters keep tests fast; `check` warns.
pub fn new_key(id: &str) -> (String, String) {
    let t = keygate::auth::NewToken::generate(id);
    let token = t.reveal().to_string();
    let hash = keygate::auth::hash_token_with(token.as_bytes(), 256, 1);
    (token, hash)
}

/// A fresh key whose hash has OWASP's memory cost (19 MiB) and `t_cost` passes: tens of
/// milliseconds a pass, for tests that need verifications to queue or to be abandoned.
pub fn key_with_cost(id: &str, t_cost: u32) -> (String, String) {
    let token = keygate::auth::NewToken::generate(id).reveal().to_string();
    let hash = keygate::auth::hash_token_with(token.as_bytes(), 19_456, t_cost);
    (token, hash)
}

/// A token for `id` with a valid checksum and a secret nobody configured: it passes the format
/// check, so refusing it costs an argon2 run.
pub fn wrong_token(id: &str) -> String {
    keygate::auth::NewToken::generate(id).reveal().to_string()
}

/// A self-signed certificate for localhost/127.0.0.1: (cert PEM, key PEM, cert DER).
pub fn test_cert() -> (String, String, CertificateDer<'static>) {
    let ck =
        rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
    (
        ck.cert.pem(),
        ck.signing_key.serialize_pem(),
        ck.cert.der().clone(),
    )
}

/// Writes `cert.pem` and `key.pem` (the names every test config uses) into `dir`: this
/// certificate `(cert PEM, key PEM, cert DER)`, or a fresh one from [`test_cert`]. Returns the
/// certificate's DER, for a client's roots.
pub fn write_cert(
    dir: &std::path::Path,
    cert: Option<(String, String, CertificateDer<'static>)>,
) -> CertificateDer<'static> {
    let (cert, key, der) = cert.unwrap_or_else(test_cert);
    std::fs::write(dir.join("cert.pem"), cert).unwrap();
    std::fs::write(dir.join("key.pem"), key).unwrap();
    der
}

/// What the upstream saw of one request.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub uri: String,
    pub headers: Vec<(String, String)>,
    pub body_len: u64,
}

impl Seen {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    pub fn header_all(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect()
    }
}

/// An in-process HTTP/1.1 upstream. Routes:
/// - `/slow?ms=N` waits N ms before answering
/// - `/bytes?n=N` streams N bytes (64 KiB chunks)
/// - `/upload` reads the whole body and answers with its length
/// - `/ws` answers a WebSocket-style upgrade with 101 and echoes bytes afterwards
/// - `/set-hsts` answers with its own Strict-Transport-Security
/// - anything else: 200 `ok`
///
/// Every request is recorded (headers and body length).
pub struct Upstream {
    pub addr: SocketAddr,
    pub seen: Arc<Mutex<Vec<Seen>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Upstream {
    pub async fn start() -> Upstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let s = seen.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let s = s.clone();
                tokio::spawn(async move {
                    let svc =
                        hyper::service::service_fn(move |req| upstream_answer(req, s.clone()));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .with_upgrades()
                        .await;
                });
            }
        });
        Upstream { addr, seen, task }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn requests(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    pub fn count(&self) -> usize {
        self.seen.lock().unwrap().len()
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn query_num(uri: &hyper::Uri, name: &str) -> Option<u64> {
    uri.query()?
        .split('&')
        .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('=')?.parse().ok())
}

async fn upstream_answer(
    mut req: Request<Incoming>,
    seen: Arc<Mutex<Vec<Seen>>>,
) -> Result<Response<Body>, std::convert::Infallible> {
    let headers = req
        .headers()
        .iter()
        .map(|(n, v)| {
            (
                n.as_str().to_string(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    let method = req.method().to_string();
    let uri = req.uri().to_string();
    let path = req.uri().path().to_string();
    if path == "/ws" {
        seen.lock().unwrap().push(Seen {
            method,
            uri,
            headers,
            body_len: 0,
        });
        let on = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            if let Ok(up) = on.await {
                let mut io = TokioIo::new(up);
                let (mut r, mut w) = tokio::io::split(&mut io);
                let _ = tokio::io::copy(&mut r, &mut w).await;
            }
        });
        let resp = Response::builder()
            .status(101)
            .header("connection", "upgrade")
            .header("upgrade", "websocket")
            .body(empty())
            .unwrap();
        return Ok(resp);
    }
    // Count the body as it streams (never buffer: uploads may be large).
    let mut body = req.into_body();
    let mut len = 0u64;
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(f) => {
                if let Some(d) = f.data_ref() {
                    len += d.len() as u64;
                }
            }
            Err(_) => break,
        }
    }
    let uri_parsed: hyper::Uri = uri.parse().unwrap_or_default();
    seen.lock().unwrap().push(Seen {
        method,
        uri: uri.clone(),
        headers,
        body_len: len,
    });
    if path == "/slow" {
        tokio::time::sleep(Duration::from_millis(
            query_num(&uri_parsed, "ms").unwrap_or(5000),
        ))
        .await;
    }
    // `n` bytes announced; with `cut=M`, the body fails 0.3 s after M of them (the upstream's
    // connection is cut mid-body).
    if path == "/bytes" {
        let n = query_num(&uri_parsed, "n").unwrap_or(0);
        let cut_at = query_num(&uri_parsed, "cut").map(|m| n - m.min(n));
        let chunk = Bytes::from(vec![b'x'; 64 * 1024]);
        let stream = futures_util::stream::unfold(n, move |left| {
            let chunk = chunk.clone();
            async move {
                if left == 0 {
                    return None;
                }
                if cut_at.is_some_and(|c| left <= c) {
                    // After what was sent has left (hyper flushes while the body waits).
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    return Some((Err("cut mid-body".into()), 0));
                }
                let take = left.min(chunk.len() as u64);
                Some((
                    Ok::<_, Box<dyn std::error::Error + Send + Sync>>(hyper::body::Frame::data(
                        chunk.slice(..take as usize),
                    )),
                    left - take,
                ))
            }
        });
        let body = http_body_util::StreamBody::new(stream).boxed();
        return Ok(Response::builder()
            .header("content-length", n)
            .body(body)
            .unwrap());
    }
    if path == "/upload" {
        return Ok(Response::new(full(len.to_string())));
    }
    // A large response head: `fields` fields `x-big-N` of `size` bytes each.
    if path == "/head" {
        let fields = query_num(&uri_parsed, "fields").unwrap_or(1);
        let size = query_num(&uri_parsed, "size").unwrap_or(600) as usize;
        let mut b = Response::builder().header("content-type", "text/plain");
        for i in 0..fields {
            b = b.header(format!("x-big-{i}"), "v".repeat(size));
        }
        return Ok(b.body(full("ok")).unwrap());
    }
    let mut b = Response::builder().header("content-type", "text/plain");
    if path == "/set-hsts" {
        b = b.header("strict-transport-security", "max-age=60");
    }
    Ok(b.body(full("ok")).unwrap())
}

/// Builds a keygate config around the test's own lines.
pub struct KeygateBuilder {
    upstream: String,
    upstream_lines: Vec<String>,
    server: Vec<String>,
    auth: Vec<String>,
    access: Vec<String>,
    keys: Vec<String>,
    raw: Vec<String>,
    admin: bool,
    state: bool,
    log_format: &'static str,
    log_lines: Vec<String>,
}

impl Default for KeygateBuilder {
    fn default() -> Self {
        KeygateBuilder {
            upstream: "http://127.0.0.1:1".into(),
            upstream_lines: vec![],
            server: vec![],
            auth: vec![],
            access: vec![],
            keys: vec![],
            raw: vec![],
            admin: false,
            state: false,
            log_format: "json",
            log_lines: vec![],
        }
    }
}

impl KeygateBuilder {
    pub fn upstream(mut self, up: &Upstream) -> Self {
        self.upstream = up.url();
        self
    }
    pub fn upstream_url(mut self, url: &str) -> Self {
        self.upstream = url.into();
        self
    }
    /// A line for `[upstream]`, e.g. `request_timeout = "300ms"`.
    pub fn upstream_line(mut self, line: &str) -> Self {
        self.upstream_lines.push(line.into());
        self
    }
    /// A line for `[server]`, e.g. `max_body_bytes = 1024`.
    pub fn server(mut self, line: &str) -> Self {
        self.server.push(line.into());
        self
    }
    /// A line for `[auth]`.
    pub fn auth(mut self, line: &str) -> Self {
        self.auth.push(line.into());
        self
    }
    /// A line for `[access]`.
    pub fn access(mut self, line: &str) -> Self {
        self.access.push(line.into());
        self
    }
    /// A `[[keys]]` entry with extra lines (e.g. `rate_limit = "2/s"`).
    pub fn key(mut self, id: &str, hash: &str, extra: &str) -> Self {
        self.keys.push(format!(
            "[[keys]]\nid = \"{id}\"\nhash = \"{hash}\"\n{extra}\n"
        ));
        self
    }
    /// Free TOML appended at the end (e.g. a `[log]` section).
    pub fn raw(mut self, toml: &str) -> Self {
        self.raw.push(toml.into());
        self
    }
    /// Start the admin listener on an ephemeral loopback port.
    pub fn admin(mut self) -> Self {
        self.admin = true;
        self
    }
    /// Keep key-usage state in the test directory (`state.json`).
    pub fn state(mut self) -> Self {
        self.state = true;
        self
    }
    /// A line for `[log]`, e.g. `client_event_limit = "5/s"`.
    pub fn log(mut self, line: &str) -> Self {
        self.log_lines.push(line.into());
        self
    }
    pub fn text_logs(mut self) -> Self {
        self.log_format = "text";
        self
    }

    pub fn config_text(&self) -> String {
        let mut s = String::new();
        s.push_str("[server]\nlisten = \"127.0.0.1:0\"\n");
        // Two event loops unless the test asks for another number.
        if !self
            .server
            .iter()
            .any(|l| l.trim_start().starts_with("workers"))
        {
            s.push_str("workers = 2\n");
        }
        for l in &self.server {
            s.push_str(l);
            s.push('\n');
        }
        s.push_str("\n[tls]\ncert = \"cert.pem\"\nkey = \"key.pem\"\n");
        s.push_str(&format!("\n[upstream]\nurl = \"{}\"\n", self.upstream));
        for l in &self.upstream_lines {
            s.push_str(l);
            s.push('\n');
        }
        s.push_str("\n[auth]\n");
        for l in &self.auth {
            s.push_str(l);
            s.push('\n');
        }
        s.push_str("\n[access]\n");
        for l in &self.access {
            s.push_str(l);
            s.push('\n');
        }
        s.push_str(&format!(
            "\n[log]\nformat = \"{}\"\nlevel = \"debug\"\n",
            self.log_format
        ));
        // Tests of other features assert every event line they cause; the per-client log
        // budget (default 10 lines per kind per minute) is tested on its own
        // (tests/log_budget.rs), so here it is out of the way unless a test sets it.
        if !self
            .log_lines
            .iter()
            .any(|l| l.starts_with("client_event_limit"))
        {
            s.push_str("client_event_limit = \"100000/s\"\n");
        }
        for l in &self.log_lines {
            s.push_str(l);
            s.push('\n');
        }
        if self.admin {
            s.push_str("\n[admin]\nlisten = \"127.0.0.1:0\"\n");
        }
        if self.state {
            s.push_str("\n[state]\npath = \"state.json\"\n");
        }
        for r in &self.raw {
            s.push('\n');
            s.push_str(r);
            s.push('\n');
        }
        for k in &self.keys {
            s.push('\n');
            s.push_str(k);
        }
        s
    }

    /// Writes cert, key and config into a temp dir and starts `keygate run`.
    pub fn start(self) -> Keygate {
        let (dir, config, der) = self.write_dir(None);
        Keygate::spawn(dir, config, der, self.admin)
    }

    /// A config directory for `keygate check` and friends, nothing started: a fresh certificate
    /// and key, and this config as `keygate.toml`. Returns (directory, config path).
    pub fn config_dir(&self) -> (tempfile::TempDir, PathBuf) {
        let (dir, config, _) = self.write_dir(None);
        (dir, config)
    }

    /// Certificate (this one, or a fresh one), key and config in a new temp dir: (directory,
    /// config path, certificate DER).
    fn write_dir(
        &self,
        cert: Option<(String, String, CertificateDer<'static>)>,
    ) -> (tempfile::TempDir, PathBuf, CertificateDer<'static>) {
        let dir = tempfile::tempdir().unwrap();
        let der = write_cert(dir.path(), cert);
        let config = dir.path().join("keygate.toml");
        std::fs::write(&config, self.config_text()).unwrap();
        (dir, config, der)
    }
}

/// A running keygate process whose stdout and stderr are captured line by line.
pub struct Keygate {
    child: Child,
    pub addr: SocketAddr,
    pub admin: Option<SocketAddr>,
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    pub ca: CertificateDer<'static>,
    output: Arc<Mutex<String>>,
}

impl Keygate {
    pub fn builder() -> KeygateBuilder {
        KeygateBuilder::default()
    }

    /// keygate in front of `upstream_url` with one key, `id`, and every other setting at its
    /// default: (keygate, the key's token).
    pub fn with_key(upstream_url: &str, id: &str) -> (Keygate, String) {
        let (token, hash) = new_key(id);
        let kg = Keygate::builder()
            .upstream_url(upstream_url)
            .key(id, &hash, "")
            .start();
        (kg, token)
    }

    fn spawn(
        dir: tempfile::TempDir,
        config: PathBuf,
        ca: CertificateDer<'static>,
        admin: bool,
    ) -> Keygate {
        Self::spawn_env(dir, config, ca, admin, &[])
    }

    /// Everything keygate printed so far (stdout and stderr).
    pub fn logs(&self) -> String {
        self.output.lock().unwrap().clone()
    }

    /// Log lines parsed as JSON (non-JSON lines skipped).
    pub fn json_logs(&self) -> Vec<serde_json::Value> {
        self.logs()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Waits until a log line satisfies `pred`; returns it.
    pub fn wait_log(
        &self,
        what: &str,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(v) = self.json_logs().into_iter().find(|v| pred(v)) {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "no log line for {what}:\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Events with `event == name`.
    pub fn events(&self, name: &str) -> Vec<serde_json::Value> {
        self.json_logs()
            .into_iter()
            .filter(|v| v["event"] == name)
            .collect()
    }

    /// The access-log line for a request id (waits for it: it is written when the body ends).
    pub fn access_line(&self, request_id: &str) -> serde_json::Value {
        self.wait_log("access line", |v| {
            v["msg"] == "request" && v["request_id"] == request_id
        })
    }

    pub fn url(&self, path: &str) -> String {
        format!("https://localhost:{}{}", self.addr.port(), path)
    }

    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.child.id().to_string())
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{sig}");
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for the process to exit; returns its exit code.
    pub fn wait_exit(&mut self, within: Duration) -> Option<i32> {
        let deadline = Instant::now() + within;
        loop {
            if let Ok(Some(s)) = self.child.try_wait() {
                return s.code();
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// A TLS client config trusting this keygate's certificate (ALPN: h2 and http/1.1 unless
    /// restricted by the caller).
    pub fn tls_config(&self) -> rustls::ClientConfig {
        tls_client_config(&self.ca)
    }

    /// A pooled HTTP/1.1 client over TLS.
    pub fn client(&self) -> TestClient {
        TestClient::new(&self.ca, false)
    }

    /// An HTTP/2 client over TLS (ALPN h2).
    pub fn client_h2(&self) -> TestClient {
        TestClient::new(&self.ca, true)
    }

    /// A raw TLS stream to keygate, for hand-written requests (ALPN http/1.1).
    pub async fn tls_stream(&self) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
        self.tls_stream_alpn(&[b"http/1.1"]).await
    }

    /// A raw TLS stream offering the given ALPN protocols.
    pub async fn tls_stream_alpn(
        &self,
        alpn: &[&[u8]],
    ) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
        let mut cfg = self.tls_config();
        cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        let tcp = tokio::net::TcpStream::connect(self.addr).await.unwrap();
        tokio_rustls::TlsConnector::from(Arc::new(cfg))
            .connect(
                rustls_pki_types::ServerName::try_from("localhost").unwrap(),
                tcp,
            )
            .await
            .unwrap()
    }
}

impl Drop for Keygate {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn tls_client_config(ca: &CertificateDer<'static>) -> rustls::ClientConfig {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.clone()).unwrap();
    rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth()
}

#[derive(Clone)]
pub struct TestClient {
    client: Client<
        hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
        Body,
    >,
}

/// A response with its body read.
#[derive(Debug)]
pub struct Got {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: Bytes,
    pub version: http::Version,
}

impl Got {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|_| panic!("not JSON: {:?}", self.body))
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

impl TestClient {
    pub fn new(ca: &CertificateDer<'static>, h2: bool) -> Self {
        let tls = tls_client_config(ca);
        let b = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_only();
        let connector = if h2 {
            b.enable_http2().build()
        } else {
            b.enable_http1().build()
        };
        let mut builder = Client::builder(TokioExecutor::new());
        builder.http2_only(h2);
        TestClient {
            client: builder.build(connector),
        }
    }

    pub async fn send(&self, req: Request<Body>) -> Got {
        let resp = self.client.request(req).await.expect("request failed");
        let (parts, body) = resp.into_parts();
        let body = body.collect().await.expect("body").to_bytes();
        Got {
            status: parts.status.as_u16(),
            headers: parts.headers,
            body,
            version: parts.version,
        }
    }

    /// Sends and returns the raw response (body not read), for streaming tests.
    pub async fn send_raw(
        &self,
        req: Request<Body>,
    ) -> Result<Response<Incoming>, hyper_util::client::legacy::Error> {
        self.client.request(req).await
    }

    pub async fn get(&self, url: &str, headers: &[(&str, &str)]) -> Got {
        let mut b = Request::get(url);
        for (n, v) in headers {
            b = b.header(*n, *v);
        }
        self.send(b.body(empty()).unwrap()).await
    }
}

/// Runs the `curl` binary; returns (status code, stdout, stderr).
pub fn curl(args: &[&str]) -> (i32, String, String) {
    captured(
        Command::new("curl")
            .args(args)
            .output()
            .expect("curl is installed"),
    )
}

/// A `method` request for `url` with `token` in `X-API-Key` and no body.
pub fn req(method: &str, url: &str, token: &str) -> Request<Body> {
    Request::builder()
        .method(method)
        .uri(url)
        .header("x-api-key", token)
        .body(empty())
        .unwrap()
}

/// Polls `f` until it returns `Some`, for at most 10 s, without blocking the runtime.
pub async fn eventually<T>(what: &str, kg: &Keygate, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}:\n{}",
            kg.logs()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Asserts none of `secrets` appears anywhere in `haystack`.
pub fn assert_no_secrets(haystack: &str, secrets: &[&str]) {
    for s in secrets {
        assert!(!s.is_empty());
        assert!(
            !haystack.contains(s),
            "secret {s:?} leaked into:\n{haystack}"
        );
    }
}

// --- Start-up variants (tests/ops.rs): extra environment, own certificate, restart. ---

impl KeygateBuilder {
    /// Like [`start`](Self::start), with extra environment variables for the process (e.g.
    /// `NOTIFY_SOCKET`) and, when given, this certificate `(cert PEM, key PEM, cert DER)`
    /// instead of a fresh one.
    pub fn start_with(
        self,
        env: &[(&str, &str)],
        cert: Option<(String, String, CertificateDer<'static>)>,
    ) -> Keygate {
        let (dir, config, der) = self.write_dir(cert);
        Keygate::spawn_env(dir, config, der, self.admin, env)
    }
}

impl Keygate {
    /// Starts a new process on the same directory (config, certificate, state file) once this
    /// one has exited (it is killed if it has not). Listeners get new ephemeral ports.
    pub fn restart(mut self, env: &[(&str, &str)]) -> Keygate {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let dir = std::mem::replace(&mut self.dir, tempfile::tempdir().unwrap());
        let admin = self.admin.is_some();
        Keygate::spawn_env(dir, self.config.clone(), self.ca.clone(), admin, env)
    }

    /// [`spawn`](Self::spawn) with extra environment variables.
    fn spawn_env(
        dir: tempfile::TempDir,
        config: PathBuf,
        ca: CertificateDer<'static>,
        admin: bool,
        env: &[(&str, &str)],
    ) -> Keygate {
        let mut child = Command::new(env!("CARGO_BIN_EXE_keygate"))
            .arg("run")
            .arg("-c")
            .arg(&config)
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start keygate");
        let output: Arc<Mutex<String>> = Arc::default();
        for pipe in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let out = output.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines() {
                    let Ok(line) = line else { break };
                    let mut o = out.lock().unwrap();
                    o.push_str(&line);
                    o.push('\n');
                }
            });
        }
        let mut kg = Keygate {
            child,
            addr: "0.0.0.0:0".parse().unwrap(),
            admin: None,
            dir,
            config,
            ca,
            output,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let logs = kg.logs();
            let addr_of = |msg: &str| {
                logs.lines().find_map(|l| {
                    let v: serde_json::Value = serde_json::from_str(l).ok()?;
                    (v["msg"] == msg).then(|| v["addr"].as_str()?.parse::<SocketAddr>().ok())?
                })
            };
            if let Some(a) = addr_of("listening") {
                kg.addr = a;
                if admin {
                    kg.admin = addr_of("admin listening");
                }
                break;
            }
            if let Ok(Some(status)) = kg.child.try_wait() {
                panic!("keygate exited with {status} before listening:\n{logs}");
            }
            assert!(Instant::now() < deadline, "keygate did not start:\n{logs}");
            std::thread::sleep(Duration::from_millis(20));
        }
        kg
    }
}
