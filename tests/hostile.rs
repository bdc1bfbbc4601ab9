//! Hostile clients over real TLS (issue 5, part 3): slowloris, oversized headers and bodies,
//! request smuggling, plaintext on the TLS port, HTTP/2 abuse (stream floods, rapid reset,
//! CONTINUATION floods, oversized header lists), identity-header spoofing and duplicate
//! credentials.
//!
//! Every test checks both sides: the hostile client gets a refusal or a closed connection and
//! never reaches the upstream with anything it should not, and a legitimate client is still
//! served. `docs/hardening.md` summarises the guarantees these tests hold keygate to.

mod common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use hyper::Request;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

// ------------------------------------------------------------------------------- helpers

/// A TLS connection with the given ALPN protocols.
async fn tls_connect(kg: &Keygate, alpn: &[&[u8]]) -> TlsStream<TcpStream> {
    kg.tls_stream_alpn(alpn).await
}

/// Reads until the peer closes (EOF, TLS error or reset: `true`) or `quiet` passes without a
/// byte (`false`).
async fn read_until_close<S: AsyncRead + Unpin>(s: &mut S, quiet: Duration) -> (String, bool) {
    let mut out = Vec::new();
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        match tokio::time::timeout(quiet, s.read(&mut buf)).await {
            Err(_) => return (String::from_utf8_lossy(&out).into_owned(), false),
            Ok(Ok(0) | Err(_)) => return (String::from_utf8_lossy(&out).into_owned(), true),
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
        }
    }
}

/// Writes `bytes` on a fresh HTTP/1.1 TLS connection and reads everything until keygate closes
/// it. The hostile keygates use `header_read_timeout = "1s"`, so even a connection left open
/// after a normal answer is closed within a second; `false` means it never was.
async fn raw_h1(kg: &Keygate, bytes: &[u8]) -> (String, bool) {
    let mut s = tls_connect(kg, &[b"http/1.1"]).await;
    // A write can fail when keygate has already answered and closed: what it said still counts.
    let _ = s.write_all(bytes).await;
    read_until_close(&mut s, Duration::from_secs(5)).await
}

/// The status codes of every HTTP/1.x response in a raw byte dump, in order.
fn statuses(raw: &str) -> Vec<u16> {
    raw.match_indices("HTTP/1.1 ")
        .filter_map(|(i, _)| raw.get(i + 9..i + 12)?.parse().ok())
        .collect()
}

/// Asserts that a fresh client with a valid key is served promptly.
async fn legit_still_served(kg: &Keygate, token: &str) {
    for client in [kg.client(), kg.client_h2()] {
        let t = Instant::now();
        let r = client.get(&kg.url("/"), &[("x-api-key", token)]).await;
        assert_eq!(
            r.status,
            200,
            "legitimate client after the attack: {}",
            r.text()
        );
        assert!(
            t.elapsed() < Duration::from_secs(2),
            "legitimate request took {:?}",
            t.elapsed()
        );
    }
}

/// Resident memory of a process, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// A keygate for hostile tests: short header deadline, small header limit, one key.
fn hostile_keygate(up: &Upstream, hash: &str, extra: &[&str]) -> Keygate {
    let mut b = Keygate::builder()
        .upstream(up)
        .server("header_read_timeout = \"1s\"")
        .server("max_header_bytes = 4096")
        .key("legit", hash, "");
    for l in extra {
        b = b.server(l);
    }
    b.start()
}

/// Just enough HTTP/2 to misbehave: frames and HPACK literals written by hand, frames read and
/// recorded as they arrive. (The `h2` crate, as a client, refuses to break the rules.)
mod h2raw {
    use super::*;
    use tokio::io::{ReadHalf, WriteHalf};

    pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    pub const HEADERS: u8 = 1;
    pub const RST_STREAM: u8 = 3;
    pub const SETTINGS: u8 = 4;
    pub const GOAWAY: u8 = 7;
    pub const CONTINUATION: u8 = 9;
    pub const END_STREAM: u8 = 0x1;
    pub const END_HEADERS: u8 = 0x4;
    pub const ACK: u8 = 0x1;
    pub const CANCEL: u32 = 0x8;
    pub const REFUSED_STREAM: u32 = 0x7;
    pub const ENHANCE_YOUR_CALM: u32 = 0xb;

    pub fn frame(ty: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = payload.len() as u32;
        let mut f = Vec::with_capacity(9 + payload.len());
        f.extend_from_slice(&len.to_be_bytes()[1..]);
        f.push(ty);
        f.push(flags);
        f.extend_from_slice(&(stream & 0x7fff_ffff).to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    /// HPACK integer with an N-bit prefix (RFC 7541 §5.1).
    fn int(out: &mut Vec<u8>, mut v: usize, prefix: u8, flags: u8) {
        let max = (1usize << prefix) - 1;
        if v < max {
            out.push(flags | v as u8);
            return;
        }
        out.push(flags | max as u8);
        v -= max;
        while v >= 128 {
            out.push((v % 128) as u8 | 0x80);
            v /= 128;
        }
        out.push(v as u8);
    }

    fn string(out: &mut Vec<u8>, s: &[u8]) {
        int(out, s.len(), 7, 0); // no Huffman
        out.extend_from_slice(s);
    }

    /// A literal header field without indexing, new name.
    pub fn field(out: &mut Vec<u8>, name: &str, value: &[u8]) {
        out.push(0x00);
        string(out, name.as_bytes());
        string(out, value);
    }

    /// The header block of `GET <path>` to localhost over https, plus `headers`.
    pub fn request(path: &str, headers: &[(&str, &str)]) -> Vec<u8> {
        let mut b = vec![0x82, 0x87]; // :method GET, :scheme https (static table)
        b.push(0x04); // :path, literal without indexing, static name 4
        string(&mut b, path.as_bytes());
        b.push(0x01); // :authority, static name 1
        string(&mut b, b"localhost");
        for (n, v) in headers {
            field(&mut b, n, v.as_bytes());
        }
        b
    }

    #[derive(Debug, Clone)]
    pub struct Frame {
        pub ty: u8,
        pub flags: u8,
        pub stream: u32,
        pub payload: Vec<u8>,
    }

    impl Frame {
        pub fn error_code(&self) -> Option<u32> {
            let at = match self.ty {
                RST_STREAM => 0,
                GOAWAY => 4,
                _ => return None,
            };
            Some(u32::from_be_bytes(
                self.payload.get(at..at + 4)?.try_into().ok()?,
            ))
        }
    }

    /// One raw HTTP/2 connection: writes are the test's, reads are recorded by a task.
    pub struct Conn {
        w: WriteHalf<TlsStream<TcpStream>>,
        pub frames: Arc<Mutex<Vec<Frame>>>,
        pub closed: Arc<AtomicBool>,
    }

    impl Conn {
        /// TLS with ALPN h2, preface, empty SETTINGS, and the ACK of the server's SETTINGS.
        pub async fn open(kg: &Keygate) -> Conn {
            let tls = tls_connect(kg, &[b"h2"]).await;
            assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
            let (r, w) = tokio::io::split(tls);
            let frames: Arc<Mutex<Vec<Frame>>> = Arc::default();
            let closed = Arc::new(AtomicBool::new(false));
            tokio::spawn(read_loop(r, frames.clone(), closed.clone()));
            let mut c = Conn { w, frames, closed };
            let mut hello = PREFACE.to_vec();
            hello.extend(frame(SETTINGS, 0, 0, &[]));
            c.send(&hello).await.unwrap();
            assert!(
                c.wait(Duration::from_secs(5), |f| f
                    .iter()
                    .any(|f| f.ty == SETTINGS && f.flags & ACK == 0))
                    .await,
                "no SETTINGS from keygate"
            );
            c.send(&frame(SETTINGS, ACK, 0, &[])).await.unwrap();
            c
        }

        pub async fn send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
            self.w.write_all(bytes).await?;
            self.w.flush().await
        }

        /// Waits until `pred` holds for the frames received so far (or the connection closed
        /// and it still does not). Returns whether it holds.
        pub async fn wait(&self, within: Duration, pred: impl Fn(&[Frame]) -> bool) -> bool {
            let deadline = Instant::now() + within;
            loop {
                let closed = self.closed.load(SeqCst);
                if pred(&self.frames.lock().unwrap()) {
                    return true;
                }
                if closed || Instant::now() > deadline {
                    return false;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }

        pub async fn wait_closed(&self, within: Duration) -> bool {
            let deadline = Instant::now() + within;
            while !self.closed.load(SeqCst) {
                if Instant::now() > deadline {
                    return false;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            true
        }

        /// The debug data of the first GOAWAY.
        pub fn goaway_debug(&self) -> String {
            self.frames
                .lock()
                .unwrap()
                .iter()
                .find(|f| f.ty == GOAWAY)
                .map(|f| {
                    String::from_utf8_lossy(f.payload.get(8..).unwrap_or_default()).into_owned()
                })
                .unwrap_or_default()
        }

        pub fn goaway(&self) -> Option<u32> {
            self.frames
                .lock()
                .unwrap()
                .iter()
                .find(|f| f.ty == GOAWAY)
                .and_then(Frame::error_code)
        }
    }

    async fn read_loop(
        mut r: ReadHalf<TlsStream<TcpStream>>,
        frames: Arc<Mutex<Vec<Frame>>>,
        closed: Arc<AtomicBool>,
    ) {
        let mut head = [0u8; 9];
        loop {
            if r.read_exact(&mut head).await.is_err() {
                break;
            }
            let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
            let mut payload = vec![0u8; len];
            if r.read_exact(&mut payload).await.is_err() {
                break;
            }
            frames.lock().unwrap().push(Frame {
                ty: head[3],
                flags: head[4],
                stream: u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff,
                payload,
            });
        }
        closed.store(true, SeqCst);
    }
}

// --------------------------------------------------------------------------------- slowloris

/// Holds a connection open, writing `trickle` one byte every 150 ms (then nothing), until the
/// server closes it. Returns how long it lived, what it read, and whether it was closed.
async fn hold_slowly<S>(s: S, trickle: &'static [u8]) -> (Duration, String, bool)
where
    S: AsyncRead + tokio::io::AsyncWrite + Send + 'static,
{
    let start = Instant::now();
    let (mut r, mut w) = tokio::io::split(s);
    let writer = tokio::spawn(async move {
        for b in trickle {
            if w.write_all(&[*b]).await.is_err() || w.flush().await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(150)).await;
        }
        std::future::pending::<()>().await;
    });
    let (got, closed) = read_until_close(&mut r, Duration::from_secs(15)).await;
    writer.abort();
    (start.elapsed(), got, closed)
}

/// Hundreds of connections hold keygate's attention as cheaply as they can: a request head
/// trickled one byte at a time; a TLS handshake and then silence; an HTTP/2 preface a byte at
/// a time; a TLS ClientHello a byte at a time. A legitimate client is served at normal latency
/// all along, and every slow connection is closed, without a response, at
/// `header_read_timeout` (the TLS stalls at `tls_handshake_timeout`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_is_cut_at_header_read_timeout_while_others_are_served() {
    const TRICKLE: usize = 200;
    const SILENT: usize = 40;
    const PREFACE_STALL: usize = 30;
    const HANDSHAKE_STALL: usize = 30;
    const TOTAL: usize = TRICKLE + SILENT + PREFACE_STALL + HANDSHAKE_STALL; // ≤ 300
    let timeout = Duration::from_secs(2);

    let up = Upstream::start().await;
    let (token, hash) = new_key("legit");
    let kg = Keygate::builder()
        .upstream(&up)
        .server("header_read_timeout = \"2s\"")
        .server("tls_handshake_timeout = \"2s\"")
        // All 300 come from 127.0.0.1: this test is about the timeouts, not the per-address cap.
        .server("max_connections_per_ip = 1000")
        .key("legit", &hash, "")
        .start();
    // Warm the verified-key cache (argon2 happens once, not during the measurement).
    assert_eq!(
        kg.client()
            .get(&kg.url("/"), &[("x-api-key", &token)])
            .await
            .status,
        200
    );

    let established = Arc::new(AtomicUsize::new(0));
    let closed_early = Arc::new(AtomicUsize::new(0));
    let handshakes = Arc::new(tokio::sync::Semaphore::new(32));
    let mut slow = Vec::new();
    for i in 0..TOTAL {
        let (trickle, alpn): (&'static [u8], &[u8]) = if i < TRICKLE {
            (
                b"GET / HTTP/1.1\r\nHost: localhost\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
                b"http/1.1",
            )
        } else if i < TRICKLE + SILENT {
            (b"", b"http/1.1")
        } else if i < TRICKLE + SILENT + PREFACE_STALL {
            (&h2raw::PREFACE[..20], b"h2")
        } else {
            // The start of a TLS record carrying a ClientHello.
            (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", b"")
        };
        let cfg = Arc::new({
            let mut c = kg.tls_config();
            c.alpn_protocols = vec![alpn.to_vec()];
            c
        });
        let addr = kg.addr;
        let (established, closed_early, handshakes) = (
            established.clone(),
            closed_early.clone(),
            handshakes.clone(),
        );
        slow.push(tokio::spawn(async move {
            let permit = handshakes.acquire_owned().await.unwrap();
            let tcp = TcpStream::connect(addr).await.unwrap();
            let held = if alpn.is_empty() {
                drop(permit);
                established.fetch_add(1, SeqCst);
                hold_slowly(tcp, trickle).await
            } else {
                let tls = tokio_rustls::TlsConnector::from(cfg)
                    .connect(
                        rustls_pki_types::ServerName::try_from("localhost").unwrap(),
                        tcp,
                    )
                    .await
                    .unwrap();
                drop(permit);
                established.fetch_add(1, SeqCst);
                hold_slowly(tls, trickle).await
            };
            if held.0 < Duration::from_millis(1500) {
                closed_early.fetch_add(1, SeqCst);
            }
            (i, held.0, held.1, held.2)
        }));
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while established.load(SeqCst) < TOTAL {
        assert!(
            Instant::now() < deadline,
            "slow connections not established"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // The legitimate client, while all of them hold their connections.
    let legit = kg.client();
    let mut latencies = Vec::new();
    let until = Instant::now() + Duration::from_millis(1200);
    while Instant::now() < until {
        let t = Instant::now();
        let r = legit.get(&kg.url("/"), &[("x-api-key", &token)]).await;
        latencies.push(t.elapsed());
        assert_eq!(r.status, 200);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        closed_early.load(SeqCst),
        0,
        "slow connections closed before header_read_timeout: the legit client did not run \
         against all of them"
    );
    latencies.sort();
    let max = *latencies.last().unwrap();
    eprintln!(
        "slowloris: {TOTAL} slow connections held; {} legitimate requests, median {:?}, max {max:?}",
        latencies.len(),
        latencies[latencies.len() / 2]
    );
    assert!(latencies.len() >= 10, "{latencies:?}");
    assert!(
        max < Duration::from_millis(750),
        "legitimate requests slowed down: {latencies:?}"
    );

    for t in slow {
        let (i, lived, got, closed) = t.await.unwrap();
        assert!(closed, "slow connection {i} still open after {lived:?}");
        assert!(
            lived >= timeout - Duration::from_millis(100) && lived < timeout * 3,
            "slow connection {i} closed after {lived:?}, expected about {timeout:?}"
        );
        // hyper sends nothing on a header timeout (no 408); an HTTP/2 stall may get the
        // server's SETTINGS frame, but never an HTTP/1 answer.
        assert!(!got.contains("HTTP/1.1"), "slow connection {i} got {got:?}");
    }
    assert_eq!(
        up.count(),
        latencies.len() + 1,
        "only legit requests upstream"
    );
    legit_still_served(&kg, &token).await;
}

// ----------------------------------------------------------------------- oversized requests

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_headers_are_refused_431() {
    let up = Upstream::start().await;
    let (token, hash) = new_key("legit");
    let kg = hostile_keygate(&up, &hash, &[]);

    // Over max_header_bytes (4096) but within hyper's buffer: the pipeline's JSON 431, and the
    // connection stays usable.
    let req = format!(
        "GET / HTTP/1.1\r\nHost: localhost\r\nX-API-Key: {token}\r\nX-Big: {}\r\n\r\n\
         GET / HTTP/1.1\r\nHost: localhost\r\nX-API-Key: {token}\r\nConnection: close\r\n\r\n",
        "a".repeat(5000)
    );
    let (raw, closed) = raw_h1(&kg, req.as_bytes()).await;
    assert!(closed);
    assert_eq!(statuses(&raw), vec![431, 200], "{raw}");
    assert!(raw.contains("application/json"), "{raw}");
    assert!(
        raw.contains("\"error\":\"request headers too large\""),
        "{raw}"
    );

    // Far over (1 MiB of header): hyper gives up at its buffer (2 × max_header_bytes) with its
    // own bare 431 and closes. The client sees that 431 (no body) or, as it is still sending,
    // a reset; never a 200, and nothing reaches the upstream.
    let huge = format!(
        "GET / HTTP/1.1\r\nHost: localhost\r\nX-API-Key: {token}\r\nX-Huge: {}\r\n\r\n",
        "b".repeat(1 << 20)
    );
    let (raw, closed) = raw_h1(&kg, huge.as_bytes()).await;
    assert!(closed);
    let st = statuses(&raw);
    assert!(st.is_empty() || st == vec![431], "{raw}");
    eprintln!("1 MiB header block over HTTP/1.1: client saw {st:?}");

    // More header lines than hyper's limit (100), each small: hyper's 431.
    let mut many = format!("GET / HTTP/1.1\r\nHost: localhost\r\nX-API-Key: {token}\r\n");
    for i in 0..150 {
        many.push_str(&format!("X-H{i}: v\r\n"));
    }
    many.push_str("\r\n");
    let (raw, closed) = raw_h1(&kg, many.as_bytes()).await;
    assert!(closed);
    assert_eq!(statuses(&raw), vec![431], "{raw}");

    // HTTP/2 over max_header_bytes: the same JSON 431 (SETTINGS_MAX_HEADER_LIST_SIZE is set
    // above max_header_bytes so that the pipeline can answer exactly).
    let h2 = kg.client_h2();
    let r = h2
        .get(
            &kg.url("/"),
            &[("x-api-key", &token), ("x-big", &"c".repeat(5000))],
        )
        .await;
    assert_eq!(r.status, 431);
    assert_eq!(r.version, http::Version::HTTP_2);
    assert_eq!(r.json()["error"], "request headers too large");

    // HTTP/2 far over the advertised header list size: h2 answers 431 itself (no body) or, for
    // a block too big to even decode, ends the connection; keygate stays up either way.
    let r = h2
        .send_raw(
            Request::get(kg.url("/"))
                .header("x-api-key", &token)
                .header("x-huge", "d".repeat(200_000))
                .body(empty())
                .unwrap(),
        )
        .await;
    match &r {
        Ok(resp) => assert_eq!(resp.status(), 431),
        Err(e) => eprintln!("200 kB header list over HTTP/2: {e}"),
    }
    assert_eq!(up.count(), 1, "only the one legitimate request");
    legit_still_served(&kg, &token).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_bodies_are_refused_413_also_with_expect_100_continue() {
    let up = Upstream::start().await;
    let (token, hash) = new_key("legit");
    let kg = hostile_keygate(&up, &hash, &["max_body_bytes = 100000"]);
    let ca = kg.dir.path().join("cert.pem").to_str().unwrap().to_string();
    let body = kg.dir.path().join("body.bin");
    std::fs::write(&body, vec![b'x'; 300_000]).unwrap();
    let small = kg.dir.path().join("small.bin");
    std::fs::write(&small, vec![b'y'; 50_000]).unwrap();
    let url = kg.url("/upload");
    let hdr = format!("X-API-Key: {token}");

    // curl announces the length and waits for 100 Continue; keygate answers 413 instead, so
    // the body is never sent.
    let curl_post = |file: &std::path::Path| {
        let data = format!("@{}", file.display());
        let (ca, url, hdr) = (ca.clone(), url.clone(), hdr.clone());
        tokio::task::spawn_blocking(move || {
            curl(&[
                "-sS",
                "--http1.1",
                "--cacert",
                &ca,
                "-H",
                &hdr,
                "-H",
                "Expect: 100-continue",
                "--expect100-timeout",
                "10",
                "--data-binary",
                &data,
                "-w",
                "\n%{http_code} %{size_upload}",
                &url,
            ])
        })
    };
    let (code, out, err) = curl_post(&body).await.unwrap();
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("\"error\":\"request body too large\""),
        "{out}"
    );
    assert!(out.ends_with("\n413 0"), "body must not be sent: {out}");
    assert_eq!(up.count(), 0);

    // Within the limit, the same client gets its 100 Continue and the upload goes through.
    let (code, out, err) = curl_post(&small).await.unwrap();
    assert_eq!(code, 0, "{err}");
    assert!(out.ends_with("50000\n200 50000"), "{out}");
    assert_eq!(up.count(), 1);

    // HTTP/2, announced too large: 413 before the upstream hears of it.
    let r = kg
        .client_h2()
        .send(
            Request::post(kg.url("/upload"))
                .header("x-api-key", &token)
                .body(full(vec![0u8; 100_001]))
                .unwrap(),
        )
        .await;
    assert_eq!(r.status, 413);
    assert_eq!(r.json()["error"], "request body too large");
    assert_eq!(up.count(), 1);
    legit_still_served(&kg, &token).await;
}

// ------------------------------------------------------------------------ request smuggling

/// Ambiguous framing is answered with 400 or a close and never reaches the upstream as a
/// second request: keygate parses each request once (hyper) and re-frames it for the upstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_smuggling_never_reaches_the_upstream_as_a_second_request() {
    let up = Upstream::start().await;
    let (token, hash) = new_key("legit");
    let kg = hostile_keygate(&up, &hash, &[]);
    // Warm the verified cache so that every case below is decided by framing alone.
    assert_eq!(
        kg.client()
            .get(&kg.url("/"), &[("x-api-key", &token)])
            .await
            .status,
        200
    );
    let t = &token;
    let smuggled =
        |n: u32| format!("GET /smuggled-{n} HTTP/1.1\r\nHost: localhost\r\nX-API-Key: {t}\r\n\r\n");

    // (name, bytes, statuses keygate may answer with, requests the upstream may see)
    let mut cases: Vec<(&str, String, Vec<Vec<u16>>, usize)> = Vec::new();
    // CL.TE: Transfer-Encoding wins (RFC 9112 §6.1), the body is the empty chunked one, and the
    // connection is closed after the answer, so the rest is never parsed.
    let s = smuggled(1);
    cases.push((
        "content-length with transfer-encoding",
        format!(
            "POST /upload HTTP/1.1\r\nHost: localhost\r\nX-API-Key: {t}\r\nContent-Length: {}\r\n\
             Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n{s}",
            5 + s.len()
        ),
        vec![vec![200]],
        1,
    ));
    let s = smuggled(2);
    cases.push((
        "transfer-encoding with content-length",
        format!(
            "POST /upload HTTP/1.1\r\nHost: localhost\r\nX-API-Key: {t}\r\n\
             Transfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n{:x}\r\n{s}\r\n0\r\n\r\n",
            s.len()
        ),
        vec![vec![200]],
        1,
    ));
    cases.push((
        "two differing content-lengths",
        format!(
            "POST /upload HTTP/1.1\r\nHost: localhost\r\nX-API-Key: {t}\r\nContent-Length: 0\r\n\
             Content-Length: {}\r\n\r\n{}",
            smuggled(3).len(),
            smuggled(3)
        ),
        vec![vec![400]],
        0,
    ));
    cases.push((
        "content-length list with differing values",
        format!(
            "POST /upload HTTP/1.1\r\nHost: localhost\r\nX-API-Key: {t}\r\n\
             Content-Length: 0, {}\r\n\r\n{}",
            smuggled(4).len(),
            smuggled(4)
        ),
        vec![vec![400]],
        0,
    ));
    cases.push((
        "signed content-length",
        format!(
            "POST /upload HTTP/1.1\r\nHost: localhost\r\nX-API-Key: {t}\r\n\
             Content-Length: +{}\r\n\r\n{}",
            smuggled(5).len(),
            smuggled(5)
        ),
        vec![vec![400]],
        0,
    ));
    cases.push((
        "obs-fold continuation line",
        format!(
            "POST /upload HTTP/1.1\r\nHost: localhost\r\nX-API-Key: {t}\r\nX-Fold: a\r\n \
             Transfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n{}",
            smuggled(6)
        ),
        vec![vec![400]],
        0,
    ));
    cases.push((
        "space before colon",
        format!(
            "POST /upload HTTP/1.1\r\nHost: localhost\r\nX-API-Key: {t}\r\n\
             Transfer-Encoding : chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n{}",
            smuggled(7)
        ),
        vec![vec![400]],
        0,
    ));
    cases.push((
        "transfer-encoding chunked, identity",
        format!(
            "POST /upload HTTP/1.1\r\nHost: localhost\r\nX-API-Key: {t}\r\n\
             Transfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n{}",
            smuggled(8)
        ),
        vec![vec![400]],
        0,
    ));
    cases.push((
        "two transfer-encoding lines, chunked first",
        format!(
            "POST /upload HTTP/1.1\r\nHost: localhost\r\nX-API-Key: {t}\r\n\
             Transfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n\r\n0\r\n\r\n{}",
            smuggled(9)
        ),
        vec![vec![400]],
        0,
    ));
    cases.push((
        "transfer-encoding on HTTP/1.0",
        format!(
            "POST /upload HTTP/1.0\r\nHost: localhost\r\nX-API-Key: {t}\r\n\
             Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n{}",
            smuggled(10)
        ),
        vec![vec![400]],
        0,
    ));
    // Bare LF: hyper (httparse) accepts a lone LF as a line end, as RFC 9112 §2.2 allows, so
    // `Content-Length` below is a real header and the "hidden" request is this one's body.
    // keygate re-serialises every header with CRLF for the upstream, so the two can never
    // disagree about where a request ends.
    let s = smuggled(11);
    cases.push((
        "bare LF line endings",
        format!(
            "POST /upload HTTP/1.1\nHost: localhost\nX-API-Key: {t}\r\nX-Note: a\n\
             Content-Length: {}\n\n{s}",
            s.len()
        ),
        vec![vec![200], vec![400]],
        1,
    ));
    // A request hidden in a body is only ever a body.
    let s = smuggled(12);
    cases.push((
        "request hidden in a body",
        format!(
            "POST /upload HTTP/1.1\r\nHost: localhost\r\nX-API-Key: {t}\r\n\
             Content-Length: {}\r\n\r\n{s}",
            s.len()
        ),
        vec![vec![200]],
        1,
    ));
    // ... also in the body of a refused request, which keygate reads and discards.
    let s = smuggled(13);
    cases.push((
        "request hidden in a refused request's body",
        format!(
            "POST /upload HTTP/1.1\r\nHost: localhost\r\nContent-Length: {}\r\n\r\n{s}",
            s.len()
        ),
        vec![vec![401]],
        0,
    ));
    // ... and in a chunked body.
    let s = smuggled(14);
    cases.push((
        "request hidden in a chunked body",
        format!(
            "POST /upload HTTP/1.1\r\nHost: localhost\r\nX-API-Key: {t}\r\n\
             Transfer-Encoding: chunked\r\n\r\n{:x}\r\n{s}\r\n0\r\n\r\n",
            s.len()
        ),
        vec![vec![200]],
        1,
    ));
    // A chunk size that overflows, then a hidden request: the body fails, the upstream request
    // (already under way, bodies stream) is aborted, and the client is told 400, not 502.
    cases.push((
        "chunk size overflow",
        format!(
            "POST /upload HTTP/1.1\r\nHost: localhost\r\nX-API-Key: {t}\r\n\
             Transfer-Encoding: chunked\r\n\r\nfffffffffffffffff1\r\n{}\r\n0\r\n\r\n",
            smuggled(15)
        ),
        vec![vec![400]],
        1,
    ));

    let mut expected_upstream = up.count();
    for (name, bytes, allowed, reaches) in &cases {
        let before = up.count();
        let (raw, closed) = raw_h1(&kg, bytes.as_bytes()).await;
        let st = statuses(&raw);
        assert!(closed, "{name}: connection left open");
        assert!(allowed.contains(&st), "{name}: answered {st:?}:\n{raw}");
        let got = up.count() - before;
        assert!(got <= *reaches, "{name}: upstream saw {got} requests");
        expected_upstream += got;
        eprintln!("{name}: {st:?}, upstream requests: {got}");
    }
    let seen = up.requests();
    assert_eq!(seen.len(), expected_upstream);
    assert!(
        seen.iter().all(|s| !s.uri.contains("smuggled")),
        "a hidden request reached the upstream: {seen:#?}"
    );
    // A client's broken body is not the upstream's failure.
    assert!(kg.events("upstream_error").is_empty(), "{}", kg.logs());
    legit_still_served(&kg, &token).await;
}

// ------------------------------------------------------------------ plaintext on the TLS port

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plaintext_http_on_the_tls_port_is_closed_promptly() {
    let up = Upstream::start().await;
    let (token, hash) = new_key("legit");
    let kg = hostile_keygate(&up, &hash, &[]);
    for hello in [
        format!("GET / HTTP/1.1\r\nHost: localhost\r\nX-API-Key: {token}\r\n\r\n").into_bytes(),
        // h2c with prior knowledge
        [h2raw::PREFACE, &h2raw::frame(h2raw::SETTINGS, 0, 0, &[])].concat(),
        b"\x16\x03\x01\x00\x05hello".to_vec(), // a TLS record header with garbage inside
    ] {
        let t = Instant::now();
        let mut tcp = TcpStream::connect(kg.addr).await.unwrap();
        tcp.write_all(&hello).await.unwrap();
        let (got, closed) = read_until_close(&mut tcp, Duration::from_secs(5)).await;
        assert!(closed, "plaintext connection left open");
        assert!(
            t.elapsed() < Duration::from_secs(2),
            "closed only after {:?} (the handshake timeout?)",
            t.elapsed()
        );
        assert!(!got.contains("HTTP/"), "{got:?}");
    }
    assert_eq!(up.count(), 0);
    legit_still_served(&kg, &token).await;
}

// ------------------------------------------------------------------------------ HTTP/2 abuse

/// More concurrent streams than `h2_max_concurrent_streams`: the extra ones are refused
/// (RST_STREAM REFUSED_STREAM) and never reach the upstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_streams_over_max_concurrent_streams_are_refused() {
    let up = Upstream::start().await;
    let (token, hash) = new_key("legit");
    let kg = hostile_keygate(&up, &hash, &["h2_max_concurrent_streams = 8"]);
    legit_still_served(&kg, &token).await;
    let before = up.count();

    let mut c = h2raw::Conn::open(&kg).await;
    let settings = c.frames.lock().unwrap()[0].payload.clone();
    // SETTINGS_MAX_CONCURRENT_STREAMS (0x3) = 8 is announced.
    assert!(
        settings
            .chunks(6)
            .any(|s| s[..2] == [0, 3] && s[2..] == 8u32.to_be_bytes()),
        "{settings:?}"
    );
    let block = h2raw::request("/slow?ms=1500", &[("x-api-key", &token)]);
    let mut burst = Vec::new();
    for i in 0..24u32 {
        burst.extend(h2raw::frame(
            h2raw::HEADERS,
            h2raw::END_STREAM | h2raw::END_HEADERS,
            2 * i + 1,
            &block,
        ));
    }
    c.send(&burst).await.unwrap();
    let refused = |f: &[h2raw::Frame]| {
        f.iter()
            .filter(|f| f.ty == h2raw::RST_STREAM && f.error_code() == Some(h2raw::REFUSED_STREAM))
            .count()
    };
    let answered = |f: &[h2raw::Frame]| {
        f.iter()
            .filter(|f| f.ty == h2raw::HEADERS && f.stream > 0)
            .count()
    };
    assert!(
        c.wait(Duration::from_secs(10), |f| answered(f) + refused(f) >= 24)
            .await,
        "{:?}",
        c.frames.lock().unwrap()
    );
    let frames = c.frames.lock().unwrap().clone();
    assert_eq!(answered(&frames), 8, "{frames:?}");
    assert_eq!(refused(&frames), 16, "{frames:?}");
    assert_eq!(
        up.count() - before,
        8,
        "only 8 streams reached the upstream"
    );
    // The connection itself is still good.
    assert!(!c.closed.load(SeqCst));
    legit_still_served(&kg, &token).await;
}

/// CVE-2023-44487 ("rapid reset"): open streams and cancel them at once, thousands of times.
/// h2's pending-accept-reset cap (`max_pending_accept_reset_streams`) ends the connection with
/// GOAWAY ENHANCE_YOUR_CALM; very little of the flood reaches the upstream, and keygate keeps
/// serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_rapid_reset_is_cut_off() {
    let up = Upstream::start().await;
    let (token, hash) = new_key("legit");
    let kg = hostile_keygate(&up, &hash, &[]);
    legit_still_served(&kg, &token).await;
    let before = up.count();

    let mut c = h2raw::Conn::open(&kg).await;
    let block = h2raw::request("/", &[("x-api-key", &token)]);
    const STREAMS: u32 = 5000;
    let mut sent = 0;
    'flood: for batch in 0..STREAMS / 100 {
        let mut bytes = Vec::new();
        for i in 0..100 {
            let id = 2 * (batch * 100 + i) + 1;
            bytes.extend(h2raw::frame(
                h2raw::HEADERS,
                h2raw::END_STREAM | h2raw::END_HEADERS,
                id,
                &block,
            ));
            bytes.extend(h2raw::frame(
                h2raw::RST_STREAM,
                0,
                id,
                &h2raw::CANCEL.to_be_bytes(),
            ));
        }
        if c.send(&bytes).await.is_err() {
            break 'flood;
        }
        sent += 100;
    }
    assert!(
        c.wait_closed(Duration::from_secs(10)).await,
        "rapid reset: connection still open after {sent} streams"
    );
    // As below: the GOAWAY can be lost to the TCP reset of a close with the flood unread.
    if let Some(code) = c.goaway() {
        assert_eq!(code, h2raw::ENHANCE_YOUR_CALM);
        assert_eq!(c.goaway_debug(), "too_many_resets");
    }
    // Give stray forwarded requests time to land before counting.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let reached = up.count() - before;
    eprintln!("rapid reset: {sent} streams sent, {reached} reached the upstream");
    assert!(
        reached <= 200,
        "{reached} of {sent} reset streams reached the upstream"
    );
    legit_still_served(&kg, &token).await;
}

/// "MadeYouReset" (CVE-2025-8671): frames that make the server reset streams itself (here:
/// a header block with a connection-specific field, a stream error PROTOCOL_ERROR).
/// `max_local_error_reset_streams` ends the connection with ENHANCE_YOUR_CALM. (DATA after
/// END_STREAM and a zero WINDOW_UPDATE, the other classic triggers, are connection errors in
/// h2: one is enough to be disconnected.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_server_side_reset_flood_is_cut_off() {
    let up = Upstream::start().await;
    let (token, hash) = new_key("legit");
    let kg = hostile_keygate(&up, &hash, &[]);
    let mut c = h2raw::Conn::open(&kg).await;
    let block = h2raw::request("/", &[("x-api-key", &token), ("connection", "close")]);
    let mut sent = 0u32;
    'flood: for batch in 0..40u32 {
        let mut bytes = Vec::new();
        for i in 0..100 {
            bytes.extend(h2raw::frame(
                h2raw::HEADERS,
                h2raw::END_STREAM | h2raw::END_HEADERS,
                2 * (batch * 100 + i) + 1,
                &block,
            ));
        }
        if c.send(&bytes).await.is_err() {
            break 'flood;
        }
        sent += 100;
    }
    assert!(
        c.wait_closed(Duration::from_secs(10)).await,
        "connection still open after {sent} self-reset streams"
    );
    let resets = c
        .frames
        .lock()
        .unwrap()
        .iter()
        .filter(|f| f.ty == h2raw::RST_STREAM)
        .count();
    eprintln!("server-side reset flood: {sent} streams sent, {resets} RST_STREAM before GOAWAY");
    // keygate closes with the rest of the flood unread, so the kernel answers with a TCP reset
    // that can destroy the GOAWAY in flight on a loaded machine; when it arrives it must name
    // the limit.
    match c.goaway() {
        Some(code) => {
            assert_eq!(code, h2raw::ENHANCE_YOUR_CALM);
            assert_eq!(c.goaway_debug(), "too_many_internal_resets");
        }
        None => eprintln!("GOAWAY lost to the TCP reset; the connection was still cut off"),
    }
    // Resets still queued when the limit hits may not make it out before the GOAWAY (and a
    // TCP reset discards whatever the client had not read yet).
    assert!(resets <= 1024, "{resets} resets");
    if c.goaway().is_some() {
        assert!(resets >= 1, "the server reset streams before giving up");
    }
    assert_eq!(up.count(), 0);
    legit_still_served(&kg, &token).await;
}

/// CONTINUATION flood (CVE-2024-27316 and kin): a header block that never ends, and one that
/// decodes to far more than the header list limit. Both end the connection quickly, and
/// keygate's memory does not grow with the flood.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_continuation_flood_is_cut_off() {
    let up = Upstream::start().await;
    let (token, hash) = new_key("legit");
    let kg = hostile_keygate(&up, &hash, &[]);
    legit_still_served(&kg, &token).await;
    let rss_before = rss_kib(kg.pid());

    // Endless tiny CONTINUATION frames.
    let mut c = h2raw::Conn::open(&kg).await;
    let block = h2raw::request("/", &[("x-api-key", &token)]);
    c.send(&h2raw::frame(h2raw::HEADERS, h2raw::END_STREAM, 1, &block))
        .await
        .unwrap();
    let mut field = Vec::new();
    h2raw::field(&mut field, "x-flood", b"1");
    let one = h2raw::frame(h2raw::CONTINUATION, 0, 1, &field);
    let t = Instant::now();
    let mut sent = 0;
    for _ in 0..100 {
        if c.send(&one.repeat(1000)).await.is_err() {
            break;
        }
        sent += 1000;
    }
    assert!(c.wait_closed(Duration::from_secs(10)).await);
    // The GOAWAY itself can be lost to the TCP reset of a close with the flood unread.
    eprintln!(
        "CONTINUATION flood: closed after {:?} with GOAWAY {:?}; {sent} frames written",
        t.elapsed(),
        c.goaway()
    );

    // Full 16 KiB CONTINUATION frames of one huge header value (1 MiB in all).
    let mut c = h2raw::Conn::open(&kg).await;
    let mut block = h2raw::request("/", &[("x-api-key", &token)]);
    h2raw::field(&mut block, "x-huge", &vec![b'h'; 1 << 20]);
    let mut chunks = block.chunks(16 * 1024).peekable();
    let first = chunks.next().unwrap();
    let mut bytes = h2raw::frame(h2raw::HEADERS, h2raw::END_STREAM, 1, first);
    while let Some(chunk) = chunks.next() {
        let flags = if chunks.peek().is_none() {
            h2raw::END_HEADERS
        } else {
            0
        };
        bytes.extend(h2raw::frame(h2raw::CONTINUATION, flags, 1, chunk));
    }
    let _ = c.send(&bytes).await;
    assert!(c.wait_closed(Duration::from_secs(10)).await);
    let answered_431 = c
        .frames
        .lock()
        .unwrap()
        .iter()
        .any(|f| f.ty == h2raw::HEADERS && f.stream == 1);
    assert!(
        c.goaway().is_some() || answered_431,
        "{:?}",
        c.frames.lock().unwrap()
    );
    eprintln!(
        "1 MiB header block over HTTP/2: GOAWAY {:?}, response headers: {answered_431}",
        c.goaway()
    );

    let rss_after = rss_kib(kg.pid());
    assert!(
        rss_after < rss_before + 32 * 1024,
        "keygate grew from {rss_before} KiB to {rss_after} KiB"
    );
    assert_eq!(up.count(), 2, "only the legitimate requests");
    legit_still_served(&kg, &token).await;
}

// --------------------------------------------------------- identity and credential headers

/// The identity header is keygate's alone: copies in any case, duplicated, folded into one
/// line, or spelled with underscores (which CGI-style upstreams map to the same variable) are
/// all removed before keygate sets its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_header_cannot_be_spoofed() {
    let up = Upstream::start().await;
    let (token, hash) = new_key("legit");
    let kg = hostile_keygate(&up, &hash, &[]);

    let req = format!(
        "GET /h1 HTTP/1.1\r\nHost: localhost\r\nX-API-Key: {token}\r\n\
         X-KEYGATE-KEY-ID: admin\r\nx-keygate-key-id: root\r\nx-keygate-key-id: root\r\n\
         X-Keygate-Key-Id: a, b\r\nX_Keygate_Key_Id: admin\r\nx-keygate_key-id: admin\r\n\
         Connection: close\r\n\r\n"
    );
    let (raw, closed) = raw_h1(&kg, req.as_bytes()).await;
    assert!(closed);
    assert_eq!(statuses(&raw), vec![200], "{raw}");

    let r = kg
        .client_h2()
        .get(
            &kg.url("/h2"),
            &[
                ("x-api-key", &token),
                ("x-keygate-key-id", "admin"),
                ("x-keygate-key-id", "root"),
                ("x_keygate_key_id", "admin"),
            ],
        )
        .await;
    assert_eq!(r.status, 200);

    let seen = up.requests();
    assert_eq!(seen.len(), 2);
    for s in &seen {
        let lookalikes: Vec<_> = s
            .headers
            .iter()
            .filter(|(n, _)| n.replace('_', "-").eq_ignore_ascii_case("x-keygate-key-id"))
            .collect();
        assert_eq!(
            lookalikes,
            vec![&("x-keygate-key-id".to_string(), "legit".to_string())],
            "{}: {:?}",
            s.uri,
            s.headers
        );
    }
}

/// Two credentials in one request are refused as `malformed` even if one of them is valid:
/// keygate will not guess which one the client meant.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_credentials_are_refused_as_malformed() {
    let up = Upstream::start().await;
    let (token, hash) = new_key("legit");
    let (other, other_hash) = new_key("other");
    let kg = Keygate::builder()
        .upstream(&up)
        .key("legit", &hash, "")
        .key("other", &other_hash, "")
        .start();
    let bearer = |t: &str| format!("Bearer {t}");
    let cases: Vec<(&str, Vec<(&str, String)>)> = vec![
        (
            "two X-API-Key, same token",
            vec![("x-api-key", token.clone()), ("x-api-key", token.clone())],
        ),
        (
            "two X-API-Key, different keys",
            vec![("x-api-key", token.clone()), ("x-api-key", other.clone())],
        ),
        (
            "X-API-Key and a different Bearer",
            vec![
                ("x-api-key", token.clone()),
                ("authorization", bearer(&other)),
            ],
        ),
        (
            "two Bearer",
            vec![
                ("authorization", bearer(&token)),
                ("authorization", bearer(&other)),
            ],
        ),
        (
            "two tokens in one X-API-Key line",
            vec![("x-api-key", format!("{token}, {other}"))],
        ),
    ];
    for client in [kg.client(), kg.client_h2()] {
        for (name, headers) in &cases {
            let h: Vec<(&str, &str)> = headers.iter().map(|(n, v)| (*n, v.as_str())).collect();
            let r = client.get(&kg.url("/"), &h).await;
            assert_eq!(r.status, 401, "{name}");
            assert_eq!(r.json()["error"], "unauthorized");
            let rid = r.header("x-request-id").unwrap().to_string();
            let ev = kg.wait_log(name, |v| {
                v["event"] == "auth_failed" && v["request_id"] == rid.as_str()
            });
            assert_eq!(ev["reason"], "malformed", "{name}: {ev}");
        }
    }
    // Raw HTTP/1.1 with the header name in two spellings: one field to hyper, so two values.
    let req = format!(
        "GET / HTTP/1.1\r\nHost: localhost\r\nX-API-KEY: {token}\r\nx-api-key: {other}\r\n\
         Connection: close\r\n\r\n"
    );
    let mut s = kg.tls_stream().await;
    s.write_all(req.as_bytes()).await.unwrap();
    let (raw, _) = read_until_close(&mut s, Duration::from_secs(5)).await;
    assert_eq!(statuses(&raw), vec![401], "{raw}");
    assert_eq!(up.count(), 0);

    // The same token as X-API-Key and Bearer is one credential, and works.
    let r = kg
        .client()
        .get(
            &kg.url("/"),
            &[("x-api-key", &token), ("authorization", &bearer(&token))],
        )
        .await;
    assert_eq!(r.status, 200);
    assert_no_secrets(&kg.logs(), &[&token, &other]);
}
