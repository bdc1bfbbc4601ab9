//! Webhook test helpers: an upstream that keeps every body byte for byte and answers with the
//! status the test asks for, and sender-side signing written independently of keygate's code
//! (straight from each scheme's documentation), so a shared mistake cannot pass unnoticed.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use hmac::{Hmac, KeyInit, Mac};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use sha2::Sha256;
use tokio::net::TcpListener;

use super::{Body, full};

/// One request as the upstream received it.
#[derive(Debug, Clone)]
pub struct Delivered {
    pub method: String,
    pub path: String,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

/// Answers `x-upstream-status` (default 200) after `x-upstream-sleep-ms` (default 0).
pub struct RecordingUpstream {
    pub addr: SocketAddr,
    pub got: Arc<Mutex<Vec<Delivered>>>,
    task: tokio::task::JoinHandle<()>,
}

impl RecordingUpstream {
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let got: Arc<Mutex<Vec<Delivered>>> = Arc::default();
        let g = got.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let g = g.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| answer(req, g.clone()));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        RecordingUpstream { addr, got, task }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn deliveries(&self) -> Vec<Delivered> {
        self.got.lock().unwrap().clone()
    }

    pub fn count(&self) -> usize {
        self.got.lock().unwrap().len()
    }
}

impl Drop for RecordingUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn answer(
    req: Request<Incoming>,
    got: Arc<Mutex<Vec<Delivered>>>,
) -> Result<Response<Body>, std::convert::Infallible> {
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    let num = |name: &str| {
        parts
            .headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
    };
    let status = num("x-upstream-status").unwrap_or(200) as u16;
    let sleep = num("x-upstream-sleep-ms").unwrap_or(0);
    got.lock().unwrap().push(Delivered {
        method: parts.method.to_string(),
        path: parts.uri.path().to_string(),
        headers: parts.headers.clone(),
        body,
    });
    if sleep > 0 {
        tokio::time::sleep(Duration::from_millis(sleep)).await;
    }
    Ok(Response::builder()
        .status(status)
        .body(full("upstream says hi"))
        .unwrap())
}

/// A secret no other test or run shares: `prefix`, then 32 random hex digits (128 bits), so a
/// leak check that finds it found this test's secret.
pub fn unique_secret(prefix: &str) -> String {
    format!(
        "{prefix}{:016x}{:016x}",
        rand::random::<u64>(),
        rand::random::<u64>()
    )
}

/// A random Standard Webhooks secret: `whsec_`, then the base64 of a `key_bytes`-byte key.
pub fn random_whsec(key_bytes: usize) -> String {
    let key: Vec<u8> = (0..key_bytes).map(|_| rand::random::<u8>()).collect();
    format!(
        "whsec_{}",
        base64::engine::general_purpose::STANDARD.encode(key)
    )
}

pub fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn mac(key: &[u8], data: &[u8]) -> Vec<u8> {
    let mut m = Hmac::<Sha256>::new_from_slice(key).unwrap();
    m.update(data);
    m.finalize().into_bytes().to_vec()
}

/// `X-Webhook-Signature: <hex>`.
pub fn sign_hex(secret: &str, body: &[u8]) -> Vec<(String, String)> {
    vec![(
        "x-webhook-signature".into(),
        hex::encode(mac(secret.as_bytes(), body)),
    )]
}

/// GitHub: `X-Hub-Signature-256: sha256=<hex>` and a delivery GUID.
pub fn sign_github(secret: &str, body: &[u8], delivery: &str) -> Vec<(String, String)> {
    vec![
        (
            "x-hub-signature-256".into(),
            format!("sha256={}", hex::encode(mac(secret.as_bytes(), body))),
        ),
        ("x-github-delivery".into(), delivery.into()),
        ("x-github-event".into(), "push".into()),
    ]
}

/// Stripe: `Stripe-Signature: t=<t>,v1=<hex of HMAC(secret, "<t>.<body>")>`.
pub fn sign_stripe(secret: &str, body: &[u8], t: i64) -> Vec<(String, String)> {
    let mut payload = format!("{t}.").into_bytes();
    payload.extend_from_slice(body);
    vec![(
        "stripe-signature".into(),
        format!("t={t},v1={}", hex::encode(mac(secret.as_bytes(), &payload))),
    )]
}

/// Standard Webhooks: key = base64 after `whsec_`, over `"<id>.<t>.<body>"`.
pub fn sign_standard(secret: &str, body: &[u8], id: &str, t: i64) -> Vec<(String, String)> {
    let key = base64::engine::general_purpose::STANDARD
        .decode(secret.trim_start_matches("whsec_"))
        .unwrap();
    let mut payload = format!("{id}.{t}.").into_bytes();
    payload.extend_from_slice(body);
    vec![
        ("webhook-id".into(), id.into()),
        ("webhook-timestamp".into(), t.to_string()),
        (
            "webhook-signature".into(),
            format!(
                "v1,{}",
                base64::engine::general_purpose::STANDARD.encode(mac(&key, &payload))
            ),
        ),
    ]
}

/// A POST with these headers and body.
pub fn post(url: &str, headers: &[(String, String)], body: &[u8]) -> Request<Body> {
    let mut b = Request::post(url);
    for (n, v) in headers {
        b = b.header(n.as_str(), v.as_str());
    }
    b.body(full(body.to_vec())).unwrap()
}

/// One unsigned GitHub delivery (a signature of zeros) to `/hooks/github` over `tls` (HTTP/1.1):
/// declares `declared` bytes (`None`: chunked), sends `sent` of them, then waits. Returns the
/// status keygate answered, 0 if none within `within`.
pub async fn unsigned_delivery(
    tls: super::Tls,
    declared: Option<usize>,
    sent: usize,
    within: Duration,
) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (mut rd, mut wr) = tokio::io::split(tls);
    let framing = match declared {
        Some(n) => format!("Content-Length: {n}"),
        None => "Transfer-Encoding: chunked".to_string(),
    };
    let head = format!(
        "POST /hooks/github HTTP/1.1\r\nHost: localhost\r\nX-Hub-Signature-256: sha256={}\r\n\
         X-GitHub-Delivery: d\r\n{framing}\r\n\r\n",
        "0".repeat(64)
    );
    let writer = tokio::spawn(async move {
        let _ = wr.write_all(head.as_bytes()).await;
        let chunk = vec![b'{'; 64 * 1024];
        let mut left = sent;
        while left > 0 {
            let n = left.min(chunk.len());
            let written = if declared.is_some() {
                wr.write_all(&chunk[..n]).await
            } else {
                let mut c = format!("{n:x}\r\n").into_bytes();
                c.extend_from_slice(&chunk[..n]);
                c.extend_from_slice(b"\r\n");
                wr.write_all(&c).await
            };
            if written.is_err() {
                return;
            }
            left -= n;
        }
        let _ = wr.flush().await;
        tokio::time::sleep(within * 2).await;
    });
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    let read = async {
        while !buf.ends_with(b"\r\n\r\n") {
            if rd.read(&mut byte).await.unwrap_or(0) == 0 {
                return 0;
            }
            buf.push(byte[0]);
        }
        String::from_utf8_lossy(&buf[9..12]).parse().unwrap_or(0)
    };
    let status = tokio::time::timeout(within, read).await.unwrap_or(0);
    writer.abort();
    status
}
