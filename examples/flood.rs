//! Load generator for `bench/flood.sh` and `bench/memory_ips.sh` (not part of keygate).
//!
//! ```text
//! flood upstream ADDR                         a tiny HTTP/1.1 upstream answering 200 "ok"
//! flood run --addr A --ca PEM --token T --key-id ID --pid PID [--requests N] [--secs S]
//!           [--conns C] [--attack-secs S]     the whole flood benchmark, Markdown on stdout
//! flood attack --addr A --ca PEM --key-id ID --conns C --secs S --xff none|one|many
//!                                             wrong-secret tokens as fast as answered
//! flood ips --addr A --ca PEM --count N [--conns C] [--offset K]
//!                                             one failed auth from each of N addresses (XFF)
//! flood distributed --addr A --ca PEM --key-id ID --tokens FILE --pid PID [--attackers N]
//!           [--first 10] [--interval-ms 3100] [--secs S] [--legit 127.0.0.2] [--quiet Q]
//!                                             issue 9: N real source addresses 127.0.0.F..,
//!                                             one connection each, wrong secrets at most one
//!                                             per interval each (under failed_auth_limit);
//!                                             a legitimate client presents each token of FILE
//!                                             for the first time (cold cache); Markdown out
//! ```
//!
//! Every loop is bounded in count and in time, and only loopback addresses are used. keygate is
//! expected to trust 127.0.0.1 as a proxy (`trusted_proxies = ["127.0.0.1/32"]`), so that
//! `X-Forwarded-For` can stand for many client addresses.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper::Request;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};

type Error = Box<dyn std::error::Error + Send + Sync>;

struct Args(HashMap<String, String>);

impl Args {
    fn parse(args: &[String]) -> Args {
        let mut m = HashMap::new();
        let mut it = args.iter();
        while let Some(a) = it.next() {
            let name = a.strip_prefix("--").unwrap_or_else(|| usage(a));
            let v = it.next().unwrap_or_else(|| usage(a));
            m.insert(name.to_string(), v.clone());
        }
        Args(m)
    }
    fn get(&self, name: &str) -> &str {
        self.0.get(name).map_or_else(|| usage(name), |s| s.as_str())
    }
    fn num(&self, name: &str, default: u64) -> u64 {
        self.0
            .get(name)
            .map_or(default, |s| s.parse().unwrap_or_else(|_| usage(name)))
    }
}

fn usage(what: &str) -> ! {
    eprintln!("flood: bad or missing argument {what:?}; see the header of examples/flood.rs");
    std::process::exit(2)
}

fn main() {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let Some(cmd) = argv.first() else {
        usage("command")
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    match cmd.as_str() {
        "upstream" => rt.block_on(upstream(argv.get(1).map_or("127.0.0.1:8000", |s| s))),
        "run" => rt.block_on(run(Args::parse(&argv[1..]))),
        "attack" => rt.block_on(attack(Args::parse(&argv[1..]))),
        "ips" => rt.block_on(ips(Args::parse(&argv[1..]))),
        "distributed" => rt.block_on(distributed(Args::parse(&argv[1..]))),
        other => usage(other),
    }
}

async fn upstream(addr: &str) {
    let l = tokio::net::TcpListener::bind(addr).await.expect("bind");
    eprintln!("upstream listening on {addr}");
    loop {
        let Ok((s, _)) = l.accept().await else {
            continue;
        };
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(|_req| async {
                Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(
                    Bytes::from_static(b"ok\n"),
                )))
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(s), svc)
                .await;
        });
    }
}

fn tls_config(ca_path: &str) -> Arc<rustls::ClientConfig> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca_path).expect("read CA PEM") {
        roots.add(c.expect("CA PEM")).expect("CA certificate");
    }
    Arc::new(
        rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

/// One keep-alive HTTP/1.1 connection over TLS.
async fn connect(
    addr: SocketAddr,
    tls: &Arc<rustls::ClientConfig>,
) -> Result<SendRequest<Empty<Bytes>>, Error> {
    connect_from(addr, tls, None).await
}

/// One keep-alive HTTP/1.1 connection over TLS, from the local address `from` if given (any
/// 127.0.0.0/8 address works on Linux loopback).
async fn connect_from(
    addr: SocketAddr,
    tls: &Arc<rustls::ClientConfig>,
    from: Option<std::net::IpAddr>,
) -> Result<SendRequest<Empty<Bytes>>, Error> {
    let tcp = match from {
        Some(ip) => {
            let sock = tokio::net::TcpSocket::new_v4()?;
            sock.bind(SocketAddr::new(ip, 0))?;
            sock.connect(addr).await?
        }
        None => tokio::net::TcpStream::connect(addr).await?,
    };
    tcp.set_nodelay(true)?;
    let s = tokio_rustls::TlsConnector::from(tls.clone())
        .connect(ServerName::try_from("localhost")?, tcp)
        .await?;
    let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s)).await?;
    tokio::spawn(conn);
    Ok(send)
}

async fn get(send: &mut SendRequest<Empty<Bytes>>, headers: &[(&str, &str)]) -> Result<u16, Error> {
    send.ready().await?;
    let mut b = Request::get("/").header("host", "localhost");
    for (n, v) in headers {
        b = b.header(*n, *v);
    }
    let resp = send.send_request(b.body(Empty::new())?).await?;
    let status = resp.status().as_u16();
    resp.into_body().collect().await?;
    Ok(status)
}

/// Sequential requests on one keep-alive connection; latencies in microseconds, sorted.
async fn measure(
    addr: SocketAddr,
    tls: &Arc<rustls::ClientConfig>,
    token: &str,
    requests: u64,
    secs: u64,
) -> (Vec<u64>, u64) {
    let mut send = connect(addr, tls)
        .await
        .expect("legitimate client connects");
    let mut lat = Vec::with_capacity(requests as usize);
    let mut not_ok = 0;
    let end = Instant::now() + Duration::from_secs(secs);
    for _ in 0..requests {
        if Instant::now() > end {
            break;
        }
        let t = Instant::now();
        match get(&mut send, &[("x-api-key", token)]).await {
            Ok(200) => lat.push(t.elapsed().as_micros() as u64),
            Ok(_) => not_ok += 1,
            Err(_) => {
                not_ok += 1;
                send = connect(addr, tls).await.expect("reconnect");
            }
        }
    }
    lat.sort_unstable();
    (lat, not_ok)
}

fn pct(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i] as f64 / 1000.0
}

/// CPU ticks (utime + stime) of a process, and of each of its threads by name.
fn cpu_ticks(pid: u32) -> (u64, Vec<(String, u64)>) {
    fn parse(stat: &str) -> Option<(String, u64)> {
        let open = stat.find('(')?;
        let close = stat.rfind(')')?;
        let name = stat[open + 1..close].to_string();
        let f: Vec<&str> = stat[close + 2..].split(' ').collect();
        // Fields 14 and 15 of stat(5); f[0] is field 3.
        Some((
            name,
            f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?,
        ))
    }
    let total = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| parse(&s))
        .map_or(0, |(_, t)| t);
    let mut threads = Vec::new();
    if let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for e in dir.flatten() {
            if let Some((name, t)) = std::fs::read_to_string(e.path().join("stat"))
                .ok()
                .and_then(|s| parse(&s))
            {
                threads.push((format!("{}#{}", name, e.file_name().to_string_lossy()), t));
            }
        }
    }
    (total, threads)
}

fn clk_tck() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok()?.trim().parse().ok())
        .unwrap_or(100.0)
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// One measurement of the legitimate client, with or without an attacker.
struct Sample {
    p50: f64,
    p99: f64,
    n: usize,
    not_ok: u64,
    cpu_pct: f64,
    busiest_threads: String,
    attack: String,
    rss_kib: u64,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

async fn run(a: Args) {
    let addr: SocketAddr = a.get("addr").parse().unwrap_or_else(|_| usage("addr"));
    let ca = a.get("ca").to_string();
    let token = a.get("token").to_string();
    let key_id = a.get("key-id").to_string();
    let pid: u32 = a.get("pid").parse().unwrap_or_else(|_| usage("pid"));
    let requests = a.num("requests", 3000);
    let secs = a.num("secs", 20);
    let conns = a.num("conns", 8);
    let rounds = a.num("rounds", 3).max(1);
    let tls = tls_config(&ca);
    let tck = clk_tck();
    let me = std::env::current_exe().expect("own path");

    // Warm-up: the key gets into the verified cache, connections and caches get warm.
    let _ = measure(addr, &tls, &token, 200, 10).await;

    // The phases are interleaved and repeated, and medians reported, so that a burst of other
    // work on the machine does not land on one phase only.
    const MODES: [&str; 4] = ["quiet", "one", "many", "none"];
    let mut samples: Vec<Vec<Sample>> = MODES.iter().map(|_| Vec::new()).collect();
    for round in 0..rounds {
        for (m, mode) in MODES.iter().enumerate() {
            eprintln!("[flood] round {}/{rounds}: {mode}", round + 1);
            let mut attacker = (*mode != "quiet").then(|| {
                Command::new(&me)
                    .args(["attack", "--addr", &addr.to_string(), "--ca", &ca])
                    .args(["--key-id", &key_id, "--conns", &conns.to_string()])
                    .args(["--secs", &(secs + 15).to_string(), "--xff", mode])
                    .stdin(Stdio::piped())
                    .stdout(Stdio::piped())
                    .spawn()
                    .expect("start the attacker")
            });
            if attacker.is_some() {
                // Let the flood reach its steady state (queues full, throttles engaged).
                tokio::time::sleep(Duration::from_secs(3)).await;
            }
            let (t0, threads0) = cpu_ticks(pid);
            let w0 = Instant::now();
            let (lat, not_ok) = measure(addr, &tls, &token, requests, secs).await;
            let wall = w0.elapsed().as_secs_f64();
            let (t1, threads1) = cpu_ticks(pid);
            let mut per_thread: Vec<(String, f64)> = threads1
                .iter()
                .map(|(n, t)| {
                    let before = threads0.iter().find(|(m, _)| m == n).map_or(0, |x| x.1);
                    (n.clone(), (t - before) as f64 / tck / wall * 100.0)
                })
                .filter(|(_, p)| *p >= 1.0)
                .collect();
            per_thread.sort_by(|x, y| y.1.total_cmp(&x.1));
            let busiest = per_thread
                .iter()
                .take(4)
                .map(|(n, p)| format!("{} {p:.0}%", n.split('#').next().unwrap_or(n)))
                .collect::<Vec<_>>()
                .join(", ");
            let attack = match attacker.take() {
                Some(mut child) => {
                    // Closing its stdin stops it (within one request); it then prints its counts.
                    drop(child.stdin.take());
                    let out = child
                        .wait_with_output()
                        .map(|o| o.stdout)
                        .unwrap_or_default();
                    String::from_utf8_lossy(&out).trim().to_string()
                }
                None => String::new(),
            };
            samples[m].push(Sample {
                p50: pct(&lat, 0.50),
                p99: pct(&lat, 0.99),
                n: lat.len(),
                not_ok,
                cpu_pct: (t1 - t0) as f64 / tck / wall * 100.0,
                busiest_threads: busiest,
                attack,
                rss_kib: rss_kib(pid),
            });
            // Let keygate's queues drain between phases.
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
    }

    let p50 = |m: usize| median(samples[m].iter().map(|s| s.p50).collect());
    let p99 = |m: usize| median(samples[m].iter().map(|s| s.p99).collect());
    println!(
        "| phase (median of {rounds}) | legit requests (non-200) | p50 ms | p99 ms | p50 flood/quiet | p99 flood/quiet | keygate CPU % | busiest keygate threads (last round) | attacker's answers (last round) | keygate RSS MiB after |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    for (m, mode) in MODES.iter().enumerate() {
        let ss = &samples[m];
        let last = ss.last().expect("at least one round");
        println!(
            "| {} | {} ({}) | {:.2} | {:.2} | {:.2}× | {:.2}× | {:.0} | {} | {} | {:.0} |",
            match *mode {
                "quiet" => "quiet (no attacker)".to_string(),
                "one" => format!("flood: {conns} conns, one IP (XFF 198.51.100.1)"),
                "many" => format!("flood: {conns} conns, a new IP per request (XFF)"),
                _ => format!("flood: {conns} conns, the legitimate client's own IP"),
            },
            ss.iter().map(|s| s.n).sum::<usize>(),
            ss.iter().map(|s| s.not_ok).sum::<u64>(),
            p50(m),
            p99(m),
            p50(m) / p50(0),
            p99(m) / p99(0),
            median(ss.iter().map(|s| s.cpu_pct).collect()),
            last.busiest_threads,
            last.attack,
            ss.iter().map(|s| s.rss_kib).max().unwrap_or(0) as f64 / 1024.0,
        );
    }
    println!();
    for (m, mode) in MODES.iter().enumerate() {
        let each: Vec<String> = samples[m]
            .iter()
            .map(|s| format!("{:.2}/{:.2}", s.p50, s.p99))
            .collect();
        println!("- {mode}: p50/p99 ms per round: {}", each.join(", "));
    }
}

/// Wrong-secret tokens for `key-id` (valid checksum, a new secret each time) as fast as keygate
/// answers, on `conns` connections, for `secs` seconds at most or until stdin closes. Prints the
/// statuses per second.
async fn attack(a: Args) {
    let addr: SocketAddr = a.get("addr").parse().unwrap_or_else(|_| usage("addr"));
    let tls = tls_config(a.get("ca"));
    let key_id = a.get("key-id").to_string();
    let conns = a.num("conns", 8);
    let secs = a.num("secs", 30);
    let mode = a.get("xff").to_string();
    let max_requests = a.num("max-requests", 2_000_000);
    let end = Instant::now() + Duration::from_secs(secs);
    let counts: Arc<[AtomicU64; 4]> = Arc::new(Default::default());
    let sent = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    {
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut sink = Vec::new();
            let _ = tokio::io::AsyncReadExt::read_to_end(&mut tokio::io::stdin(), &mut sink).await;
            stop.store(true, Relaxed);
        });
    }
    let mut tasks = Vec::new();
    for c in 0..conns {
        let (tls, key_id, mode, counts, sent, stop) = (
            tls.clone(),
            key_id.clone(),
            mode.clone(),
            counts.clone(),
            sent.clone(),
            stop.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut send = None;
            let mut i: u64 = c << 32;
            while Instant::now() < end
                && !stop.load(Relaxed)
                && sent.fetch_add(1, Relaxed) < max_requests
            {
                if send.is_none() {
                    send = connect(addr, &tls).await.ok();
                    if send.is_none() {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                }
                i += 1;
                let token = keygate::auth::NewToken::generate(&key_id);
                let xff = match mode.as_str() {
                    "one" => Some("198.51.100.1".to_string()),
                    // 100.64.0.0/10 (CGNAT space), a different address per request.
                    "many" => {
                        let n = (i.wrapping_mul(2_654_435_761) ^ c) & 0x3f_ffff;
                        Some(format!(
                            "100.{}.{}.{}",
                            64 + (n >> 16),
                            (n >> 8) & 0xff,
                            n & 0xff
                        ))
                    }
                    _ => None,
                };
                let mut h = vec![("x-api-key", token.reveal())];
                if let Some(x) = &xff {
                    h.push(("x-forwarded-for", x));
                }
                let r = tokio::time::timeout(
                    Duration::from_secs(5),
                    get(send.as_mut().expect("connected"), &h),
                )
                .await;
                let slot = match r {
                    Ok(Ok(401)) => 0,
                    Ok(Ok(429)) => 1,
                    Ok(Ok(_)) => 2,
                    _ => {
                        send = None;
                        3
                    }
                };
                counts[slot].fetch_add(1, Relaxed);
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    let wall = start.elapsed().as_secs_f64();
    let per = |i: usize| counts[i].load(Relaxed) as f64 / wall;
    println!(
        "401 {:.0}/s, 429 {:.0}/s, other {:.0}/s, errors {:.0}/s",
        per(0),
        per(1),
        per(2),
        per(3)
    );
}

/// One failed authentication (an unknown key id: a guess, no hashing) from each of `count`
/// addresses, sent as `X-Forwarded-For` through `conns` connections. `offset` shifts the address
/// range so a second run uses new addresses. Prints what came back and the rate.
async fn ips(a: Args) {
    let addr: SocketAddr = a.get("addr").parse().unwrap_or_else(|_| usage("addr"));
    let tls = tls_config(a.get("ca"));
    let count = a.num("count", 100_000);
    let conns = a.num("conns", 8);
    let offset = a.num("offset", 0);
    let max_secs = a.num("secs", 600);
    let next = Arc::new(AtomicU64::new(0));
    let statuses: Arc<[AtomicU64; 3]> = Arc::new(Default::default());
    let start = Instant::now();
    let end = start + Duration::from_secs(max_secs);
    let token = keygate::auth::NewToken::generate("nobody-here");
    let token: Arc<str> = token.reveal().into();
    let mut tasks = Vec::new();
    for _ in 0..conns {
        let (tls, next, statuses, token) =
            (tls.clone(), next.clone(), statuses.clone(), token.clone());
        tasks.push(tokio::spawn(async move {
            let mut send = None;
            loop {
                let i = next.fetch_add(1, Relaxed);
                if i >= count || Instant::now() > end {
                    break;
                }
                if send.is_none() {
                    send = match connect(addr, &tls).await {
                        Ok(s) => Some(s),
                        Err(e) => {
                            if statuses[2].load(Relaxed) == 0 {
                                eprintln!("flood: cannot connect: {e}");
                            }
                            None
                        }
                    };
                }
                let Some(s) = send.as_mut() else {
                    statuses[2].fetch_add(1, Relaxed);
                    continue;
                };
                // 10.0.0.0/8 holds 16.7 million addresses: plenty, all distinct.
                let n = (i + offset) & 0xff_ffff;
                let xff = format!("10.{}.{}.{}", n >> 16, (n >> 8) & 0xff, n & 0xff);
                match get(s, &[("x-api-key", &token), ("x-forwarded-for", &xff)]).await {
                    Ok(401) => statuses[0].fetch_add(1, Relaxed),
                    Ok(_) => statuses[1].fetch_add(1, Relaxed),
                    Err(e) => {
                        if statuses[2].load(Relaxed) == 0 {
                            eprintln!("flood: request failed: {e}");
                        }
                        send = None;
                        statuses[2].fetch_add(1, Relaxed)
                    }
                };
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    let wall = start.elapsed().as_secs_f64();
    let [u, o, e] = &*statuses;
    println!(
        "{} addresses in {wall:.1}s ({:.0}/s): 401 {}, other status {}, errors {}",
        count,
        count as f64 / wall,
        u.load(Relaxed),
        o.load(Relaxed),
        e.load(Relaxed)
    );
    if let Some(pid) = a.0.get("pid").and_then(|p| p.parse().ok()) {
        println!("keygate VmRSS {} KiB", rss_kib(pid));
    }
}

/// Issue 9 §1: `attackers` source addresses (127.0.0.`first`…), one connection each, send
/// wrong-secret tokens for `key-id` (valid checksum), each at most one per `interval-ms` (so
/// each stays under `failed_auth_limit`) and never more than one in flight. Meanwhile a
/// legitimate client at `legit` presents, one after another on a fresh connection each, tokens
/// whose keys were never used (first authentication: argon2 must run). `quiet` tokens are
/// presented first with no attacker, as the baseline. Prints one Markdown table.
async fn distributed(a: Args) {
    let addr: SocketAddr = a.get("addr").parse().unwrap_or_else(|_| usage("addr"));
    let tls = tls_config(a.get("ca"));
    let key_id = a.get("key-id").to_string();
    let pid: u32 = a.get("pid").parse().unwrap_or_else(|_| usage("pid"));
    let tokens: Vec<String> = std::fs::read_to_string(a.get("tokens"))
        .expect("read tokens")
        .lines()
        .map(str::to_string)
        .filter(|l| !l.is_empty())
        .collect();
    let attackers = a.num("attackers", 200);
    let first = a.num("first", 10);
    let interval = Duration::from_millis(a.num("interval-ms", 3100));
    let secs = a.num("secs", 60);
    let quiet = (a.num("quiet", 10) as usize).min(tokens.len());
    let legit: std::net::IpAddr =
        a.0.get("legit")
            .map_or("127.0.0.2", |s| s.as_str())
            .parse()
            .unwrap_or_else(|_| usage("legit"));
    let tck = clk_tck();

    // One first authentication: connect (not timed), then time the request.
    let first_auth = |token: String| {
        let tls = tls.clone();
        async move {
            let mut send = connect_from(addr, &tls, Some(legit)).await.ok()?;
            let t = Instant::now();
            let status = tokio::time::timeout(
                Duration::from_secs(30),
                get(&mut send, &[("x-api-key", &token)]),
            )
            .await
            .ok()?
            .ok()?;
            Some((status, t.elapsed().as_micros() as u64))
        }
    };

    let mut quiet_lat = Vec::new();
    for t in &tokens[..quiet] {
        if let Some((200, us)) = first_auth(t.clone()).await {
            quiet_lat.push(us);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    quiet_lat.sort_unstable();

    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    // 401 (hashed), 429, 503 (refused unhashed), other, errors
    let counts: Arc<[AtomicU64; 5]> = Arc::new(Default::default());
    let mut tasks = Vec::new();
    for i in 0..attackers {
        let ip = std::net::IpAddr::V4(std::net::Ipv4Addr::from(
            u32::from(std::net::Ipv4Addr::new(127, 0, 0, 0)) + (first + i) as u32,
        ));
        let (tls, key_id, stop, counts) =
            (tls.clone(), key_id.clone(), stop.clone(), counts.clone());
        tasks.push(tokio::spawn(async move {
            let mut send = None;
            while !stop.load(Relaxed) {
                let next = Instant::now() + interval;
                if send.is_none() {
                    send = connect_from(addr, &tls, Some(ip)).await.ok();
                }
                if let Some(s) = send.as_mut() {
                    let token = keygate::auth::NewToken::generate(&key_id);
                    let slot = match tokio::time::timeout(
                        Duration::from_secs(30),
                        get(s, &[("x-api-key", token.reveal())]),
                    )
                    .await
                    {
                        Ok(Ok(401)) => 0,
                        Ok(Ok(429)) => 1,
                        Ok(Ok(503)) => 2,
                        Ok(Ok(_)) => 3,
                        _ => {
                            send = None;
                            4
                        }
                    };
                    counts[slot].fetch_add(1, Relaxed);
                }
                tokio::time::sleep_until(next.into()).await;
            }
        }));
    }
    // Let the flood reach its steady state: every attacker address has been answered once (so
    // keygate has seen each one fail, as in a flood that has run for a while), 90 s at most.
    let warm_end = Instant::now() + Duration::from_secs(90);
    while counts.iter().map(|c| c.load(Relaxed)).sum::<u64>() < attackers
        && Instant::now() < warm_end
    {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let c0: Vec<u64> = counts.iter().map(|c| c.load(Relaxed)).collect();
    let (t0, threads0) = cpu_ticks(pid);
    let w0 = Instant::now();
    let end = w0 + Duration::from_secs(secs);
    let mut lat = Vec::new();
    let mut not_ok = 0u64;
    for t in &tokens[quiet..] {
        if Instant::now() > end {
            break;
        }
        match first_auth(t.clone()).await {
            Some((200, us)) => lat.push(us),
            _ => not_ok += 1,
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let wall = w0.elapsed().as_secs_f64();
    let (t1, threads1) = cpu_ticks(pid);
    let c1: Vec<u64> = counts.iter().map(|c| c.load(Relaxed)).collect();
    stop.store(true, Relaxed);
    for t in tasks {
        t.abort();
    }
    lat.sort_unstable();
    let argon2_cpu: f64 = threads1
        .iter()
        .filter(|(n, _)| n.starts_with("keygate-argon2"))
        .map(|(n, t)| {
            let before = threads0.iter().find(|(m, _)| m == n).map_or(0, |x| x.1);
            (t - before) as f64 / tck / wall * 100.0
        })
        .sum();
    let rate = |i: usize| (c1[i] - c0[i]) as f64 / wall;
    println!(
        "| phase | first authentications (failed) | p50 ms | p99 ms | max ms | keygate CPU % | argon2 threads CPU % | attackers' 401/s (= wrong hashes/s) | 429/s | 503/s (refused unhashed) | errors/s |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    println!(
        "| quiet | {} (0) | {:.1} | {:.1} | {:.1} | | | | | | |",
        quiet_lat.len(),
        pct(&quiet_lat, 0.5),
        pct(&quiet_lat, 0.99),
        pct(&quiet_lat, 1.0)
    );
    println!(
        "| flood: {attackers} addresses 127.0.0.{first}-{}, 1 conn each, ≤1 guess/{:.1}s each | {} ({not_ok}) | {:.1} | {:.1} | {:.1} | {:.0} | {:.0} | {:.1} | {:.1} | {:.1} | {:.1} |",
        first + attackers - 1,
        interval.as_secs_f64(),
        lat.len(),
        pct(&lat, 0.5),
        pct(&lat, 0.99),
        pct(&lat, 1.0),
        (t1 - t0) as f64 / tck / wall * 100.0,
        argon2_cpu,
        rate(0),
        rate(1),
        rate(2),
        rate(4),
    );
}
