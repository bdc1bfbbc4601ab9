//! hsload — full-TLS-handshake load generator for the keygate benchmark.
//!
//! Every request gets a brand-new TCP connection and a brand-new TLS session:
//! resumption is disabled in the client (no session cache, no tickets, no
//! PSK), so the server must do a full handshake (key exchange + certificate
//! signature) each time. Each handshake is checked with rustls'
//! `handshake_kind()`; resumed ones are counted (there should be none).
//! wrk and h2load cannot be used for this: with "Connection: close" both
//! resume the previous session on reconnect (verified with nginx's
//! `$ssl_session_reused`), which skips the certificate signature.
//!
//! Closed loop: C threads, each runs connect -> full handshake -> one
//! HTTP/1.1 request with "Connection: close" -> read the whole response ->
//! close, over and over, for D seconds. The client is rustls (not OpenSSL)
//! because OpenSSL 3.0's client handshake costs ~1 ms of CPU on the bench
//! machine and would be the bottleneck on two cores.
//!
//! Latency is measured from just before connect() to the last byte of the
//! response, so it includes TCP setup and the TLS handshake. Output, one line:
//!   RESULT requests=N ok=N non2xx=N errors=N resumed=N elapsed_s=F rps=F
//!          p50_us=N p90_us=N p99_us=N max_us=N hs_p50_us=N hs_p99_us=N
//!          proto=... cipher=... group=...
//!
//! Usage: hsload [-h 127.0.0.1] [-p 8443] [-c 10] [-d 10] [-u /small]
//!               [-s localhost] [-H 'Name: value']...

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, ClientConnection, DigitallySignedStruct, HandshakeKind, SignatureScheme};

/// Skips chain validation (the bench certificate is self-signed) but still
/// verifies the server's handshake signature, as a real client does.
#[derive(Debug)]
struct AnyChain(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyChain {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

struct Opts {
    addr: SocketAddr,
    conns: usize,
    duration: Duration,
    path: String,
    sni: String,
    headers: Vec<String>,
}

#[derive(Default)]
struct Stats {
    lat_us: Vec<u32>,
    hs_us: Vec<u32>,
    ok: u64,
    non2xx: u64,
    errors: u64,
    resumed: u64,
}

static NEGOTIATED: OnceLock<String> = OnceLock::new();

fn usage() -> ! {
    eprintln!(
        "usage: hsload [-h host] [-p port] [-c conns] [-d seconds] [-u path] [-s sni] [-H 'Name: value']..."
    );
    std::process::exit(2)
}

fn parse_args() -> Opts {
    let mut host = "127.0.0.1".to_string();
    let mut port = 8443u16;
    let mut conns = 10usize;
    let mut secs = 10f64;
    let mut path = "/small".to_string();
    let mut sni = "localhost".to_string();
    let mut headers = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let val = args.next().unwrap_or_else(|| usage());
        match flag.as_str() {
            "-h" => host = val,
            "-p" => port = val.parse().unwrap_or_else(|_| usage()),
            "-c" => conns = val.parse().unwrap_or_else(|_| usage()),
            "-d" => secs = val.parse().unwrap_or_else(|_| usage()),
            "-u" => path = val,
            "-s" => sni = val,
            "-H" => headers.push(val),
            _ => usage(),
        }
    }
    if conns == 0 || !(secs > 0.0) {
        usage()
    }
    let addr = format!("{host}:{port}").parse().unwrap_or_else(|_| usage());
    Opts { addr, conns, duration: Duration::from_secs_f64(secs), path, sni, headers }
}

fn us(d: Duration) -> u32 {
    d.as_micros().min(u32::MAX as u128) as u32
}

/// One connection, one full handshake, one request. Returns the HTTP status.
fn one_request(
    opts: &Opts,
    cfg: &Arc<ClientConfig>,
    name: &ServerName<'static>,
    request: &[u8],
    st: &mut Stats,
) -> io::Result<u16> {
    let t0 = Instant::now();
    let mut sock = TcpStream::connect(opts.addr)?;
    sock.set_nodelay(true)?;
    let mut conn = ClientConnection::new(cfg.clone(), name.clone()).map_err(io::Error::other)?;
    while conn.is_handshaking() {
        conn.complete_io(&mut sock)?;
    }
    let hs = t0.elapsed();
    if conn.handshake_kind() == Some(HandshakeKind::Resumed) {
        st.resumed += 1;
    }
    if NEGOTIATED.get().is_none() {
        let _ = NEGOTIATED.set(format!(
            "proto={:?} cipher={:?} group={}",
            conn.protocol_version().unwrap(),
            conn.negotiated_cipher_suite().unwrap().suite(),
            conn.negotiated_key_exchange_group()
                .map_or_else(|| "-".to_string(), |g| format!("{:?}", g.name())),
        ));
    }

    let mut tls = rustls::Stream::new(&mut conn, &mut sock);
    tls.write_all(request)?;
    tls.flush()?;

    let mut buf = vec![0u8; 64 * 1024];
    let mut head: Vec<u8> = Vec::with_capacity(1024);
    let mut status = 0u16;
    let mut clen: Option<u64> = None;
    let mut body = 0u64;
    let mut in_body = false;
    loop {
        let n = match tls.read(&mut buf) {
            Ok(n) => n,
            // Peer closed TCP without close_notify: same as EOF for us.
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => 0,
            Err(e) => return Err(e),
        };
        if n == 0 {
            if in_body && clen.is_none() {
                break; // body delimited by connection close
            }
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "short response"));
        }
        if in_body {
            body += n as u64;
        } else {
            head.extend_from_slice(&buf[..n]);
            let Some(pos) = head.windows(4).position(|w| w == b"\r\n\r\n") else {
                if head.len() > 64 * 1024 {
                    return Err(io::Error::other("header block too large"));
                }
                continue;
            };
            let text = String::from_utf8_lossy(&head[..pos]);
            let mut lines = text.split("\r\n");
            let first = lines.next().unwrap_or("");
            if !first.starts_with("HTTP/1.") || first.len() < 12 {
                return Err(io::Error::other("not an HTTP/1 response"));
            }
            status = first[9..12].parse().map_err(io::Error::other)?;
            for l in lines {
                if let Some((k, v)) = l.split_once(':') {
                    if k.trim().eq_ignore_ascii_case("content-length") {
                        clen = v.trim().parse().ok();
                    }
                }
            }
            body = (head.len() - pos - 4) as u64;
            in_body = true;
        }
        if let Some(c) = clen {
            if body >= c {
                break;
            }
        }
    }
    // Dropping the socket closes it; no close_notify from us, nothing kept.
    drop(tls);
    st.lat_us.push(us(t0.elapsed()));
    st.hs_us.push(us(hs));
    Ok(status)
}

fn pct(v: &[u32], p: f64) -> u32 {
    if v.is_empty() {
        return 0;
    }
    let i = ((p / 100.0) * v.len() as f64) as usize;
    v[i.min(v.len() - 1)]
}

fn main() {
    let opts = Arc::new(parse_args());
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyChain(provider)))
        .with_no_client_auth();
    cfg.resumption = rustls::client::Resumption::disabled();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    let cfg = Arc::new(cfg);
    let name = ServerName::try_from(opts.sni.clone()).expect("server name");

    let mut request = format!("GET {} HTTP/1.1\r\nHost: {}\r\n", opts.path, opts.sni);
    for h in &opts.headers {
        request.push_str(h);
        request.push_str("\r\n");
    }
    request.push_str("Connection: close\r\n\r\n");
    let request = Arc::new(request.into_bytes());

    let stop = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let handles: Vec<_> = (0..opts.conns)
        .map(|_| {
            let (opts, cfg, name, request, stop) =
                (opts.clone(), cfg.clone(), name.clone(), request.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut st = Stats::default();
                while !stop.load(Ordering::Relaxed) {
                    match one_request(&opts, &cfg, &name, &request, &mut st) {
                        Ok(s) if (200..300).contains(&s) => st.ok += 1,
                        Ok(_) => st.non2xx += 1,
                        Err(e) => {
                            if st.errors == 0 {
                                eprintln!("hsload: request failed: {e}");
                            }
                            st.errors += 1;
                            // Do not spin on a refused/failed connection.
                            std::thread::sleep(Duration::from_millis(1));
                        }
                    }
                }
                st
            })
        })
        .collect();
    std::thread::sleep(opts.duration);
    stop.store(true, Ordering::Relaxed);
    let mut all = Stats::default();
    for h in handles {
        let st = h.join().expect("worker thread");
        all.lat_us.extend(st.lat_us);
        all.hs_us.extend(st.hs_us);
        all.ok += st.ok;
        all.non2xx += st.non2xx;
        all.errors += st.errors;
        all.resumed += st.resumed;
    }
    let elapsed = start.elapsed().as_secs_f64();
    all.lat_us.sort_unstable();
    all.hs_us.sort_unstable();
    let done = all.ok + all.non2xx;
    println!(
        "RESULT requests={} ok={} non2xx={} errors={} resumed={} elapsed_s={:.3} rps={:.1} \
         p50_us={} p90_us={} p99_us={} max_us={} hs_p50_us={} hs_p99_us={} {}",
        done,
        all.ok,
        all.non2xx,
        all.errors,
        all.resumed,
        elapsed,
        done as f64 / elapsed,
        pct(&all.lat_us, 50.0),
        pct(&all.lat_us, 90.0),
        pct(&all.lat_us, 99.0),
        all.lat_us.last().copied().unwrap_or(0),
        pct(&all.hs_us, 50.0),
        pct(&all.hs_us, 99.0),
        NEGOTIATED.get().map(String::as_str).unwrap_or("proto=- cipher=- group=-"),
    );
    std::process::exit(if done > 0 { 0 } else { 1 });
}
