//! What one connection can make keygate hold (issue 9 §3; README "Memory"): clients that do not
//! read a large response, and upstream response heads at and past their limit. Figures are
//! measured by `bench/attack.sh`; these tests assert bounds generous enough not to depend on the
//! machine.

mod common;

use std::time::{Duration, Instant};

use common::*;
use tokio::io::AsyncWriteExt;

/// Resident memory of a process, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// A TLS connection (ALPN http/1.1) with a 4 KiB receive buffer, set before connecting so that
/// the window stays small: what the client does not read waits in keygate's buffers.
async fn small_window_tls(kg: &Keygate) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    let tcp = sock.connect(kg.addr).await.unwrap();
    let mut cfg = kg.tls_config();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    tokio_rustls::TlsConnector::from(std::sync::Arc::new(cfg))
        .connect(
            rustls_pki_types::ServerName::try_from("localhost").unwrap(),
            tcp,
        )
        .await
        .unwrap()
}

/// 64 clients ask for 16 MiB each and read nothing. keygate's documented bound is one upstream
/// chunk per such client (the upstream read buffer it came in, 16,320 bytes; its TLS record
/// goes to the kernel, and only when the socket's send buffer is full stays, 16 KiB more) plus
/// the two connections' own state, about 64 KiB in all (README "Memory"); with hyper's default
/// buffers it was ~750 KiB, ~110 KiB before the write gate, ~85 KiB before the TLS record was
/// handed to the kernel. The test allows 150 KiB per client, and checks that keygate still serves a normal request meanwhile (the
/// upstream connections of the slow readers are paced by them, `body::ReadPacer`, and must not
/// hold anyone else up) and gives the memory back once they are gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_do_not_read_make_keygate_hold_a_bounded_number_of_bytes() {
    const READERS: usize = 64;
    let up = Upstream::start().await;
    let (token, hash) = new_key("reader");
    let kg = Keygate::builder()
        .upstream(&up)
        .server("max_connections_per_ip = 1024")
        .auth("default_max_concurrent = 1024")
        .key("reader", &hash, "")
        .start();
    let client = kg.client();
    let get = |path: &str| {
        http::Request::get(kg.url(path))
            .header("x-api-key", &token)
            .body(empty())
            .unwrap()
    };
    assert_eq!(client.send(get("/")).await.status, 200);
    // The first request's argon2 verification (19 MiB of working memory) is over and freed.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let before = rss_kib(kg.pid());

    let mut readers = Vec::new();
    for _ in 0..READERS {
        let mut s = small_window_tls(&kg).await;
        let req = format!(
            "GET /bytes?n={} HTTP/1.1\r\nhost: localhost\r\nx-api-key: {token}\r\n\r\n",
            16 << 20
        );
        s.write_all(req.as_bytes()).await.unwrap();
        s.flush().await.unwrap();
        readers.push(s);
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while up.count() < READERS + 1 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        up.count(),
        READERS + 1,
        "not every slow reader reached the upstream"
    );
    // Every buffer on the way fills up within a moment on loopback; sample for a while.
    let mut peak = 0;
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        peak = peak.max(rss_kib(kg.pid()));
    }
    let per_reader = peak.saturating_sub(before) / READERS as u64;
    eprintln!(
        "RSS {before} KiB -> peak {peak} KiB with {READERS} slow readers: {per_reader} KiB each"
    );
    assert!(
        per_reader < 150,
        "{per_reader} KiB per client that does not read (RSS {before} -> {peak} KiB)"
    );

    // Others are still served while the slow readers hold their connections, and a body of
    // many chunks streams through the write gate to its end (it would stall if hyper stopped
    // polling the body again after a completed flush: body.rs, `WriteGate`).
    let got = tokio::time::timeout(
        Duration::from_secs(60),
        client.send(get(&format!("/bytes?n={}", 8 << 20))),
    )
    .await
    .expect("an 8 MiB body stalled");
    assert_eq!(got.status, 200);
    assert_eq!(got.body.len(), 8 << 20);

    drop(readers);
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut now = rss_kib(kg.pid());
    while now > before + 8 * 1024 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(250)).await;
        now = rss_kib(kg.pid());
    }
    assert!(
        now <= before + 8 * 1024,
        "memory not given back after the slow readers left: {before} KiB before, {now} KiB now"
    );
}

/// Bytes keygate's socket to `client` holds that the client has not acknowledged (sent and in
/// flight, or not sent yet): the `tx_queue` column of `/proc/net/tcp` for that connection.
fn unacked_bytes(kg: &Keygate, client: std::net::SocketAddr) -> Option<u64> {
    let hex = |a: std::net::SocketAddr| match a {
        std::net::SocketAddr::V4(v4) => format!(
            "{:08X}:{:04X}",
            u32::from_le_bytes(v4.ip().octets()),
            v4.port()
        ),
        std::net::SocketAddr::V6(_) => unreachable!("the test harness listens on IPv4"),
    };
    let (local, remote) = (hex(kg.addr), hex(client));
    std::fs::read_to_string("/proc/net/tcp")
        .unwrap()
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|f| f.len() > 4 && f[1] == local && f[2] == remote)
        .and_then(|f| u64::from_str_radix(f[4].split(':').next()?, 16).ok())
}

/// A client that stops reading a 16 MiB response makes the kernel hold a bounded amount for it,
/// not `tcp_wmem`'s 4 MiB: keygate sets `TCP_NOTSENT_LOWAT` (128 KiB, `server::CLIENT_NOTSENT_LOWAT`)
/// on client sockets, and once the socket refuses a TLS record keygate hands that record to the
/// kernel and makes no new one until the kernel reports room (README "Memory"). Before, ~3.9 MB
/// sat in each such socket on loopback. The bound checked: 128 KiB unsent + one 64 KiB segment
/// the kernel fills past it + one TLS record + the client's small window, with a margin: 512 KiB.
/// The client then reads the whole body, every byte in order (the handed-over records are part of
/// the stream).
#[tokio::test]
async fn a_client_that_stops_reading_leaves_a_bounded_amount_in_the_kernel() {
    use tokio::io::AsyncReadExt;
    let up = Upstream::start().await;
    let (kg, token) = Keygate::with_key(&up.url(), "stalled");
    let mut s = small_window_tls(&kg).await;
    let me = s.get_ref().0.local_addr().unwrap();
    let n = 16 << 20;
    let req = format!(
        "GET /bytes?n={n} HTTP/1.1\r\nhost: localhost\r\nx-api-key: {token}\r\nconnection: close\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.unwrap();
    s.flush().await.unwrap();
    // The socket fills within moments on loopback; wait until what it holds stops changing.
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut last = None;
    let held = loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = unacked_bytes(&kg, me);
        if now.is_some() && now == last || Instant::now() > deadline {
            break now.expect("keygate's side of the connection in /proc/net/tcp");
        }
        last = now;
    };
    eprintln!("keygate's socket holds {held} bytes for a client that stopped reading");
    assert!(
        held > 0,
        "nothing was sent: the test does not test anything"
    );
    assert!(
        held <= 512 * 1024,
        "{held} bytes held in the kernel for one client that does not read"
    );
    // Reading resumes: the whole body arrives, intact.
    let mut all = Vec::new();
    tokio::time::timeout(Duration::from_secs(60), s.read_to_end(&mut all))
        .await
        .expect("the body stalled after the client resumed reading")
        .unwrap();
    let body_at = all.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    assert!(all.starts_with(b"HTTP/1.1 200"), "{:?}", &all[..40]);
    assert_eq!(all.len() - body_at, n);
    assert!(
        all[body_at..].iter().all(|&b| b == b'x'),
        "body bytes changed"
    );
}

/// An upstream response head is read into the upstream connection's buffer, so its size is
/// bounded by `forward::UPSTREAM_READ_BUF` (16,320 bytes; README "Memory"): a set of big
/// `Set-Cookie`-like fields up to that passes whole, over HTTP/1.1 and HTTP/2, and a larger one
/// is a JSON 502 at once (not a hang, not a truncated head), after which the key and the pool
/// still serve.
#[tokio::test]
async fn a_large_upstream_head_passes_up_to_its_bound_and_past_it_is_a_json_502() {
    let up = Upstream::start().await;
    let (kg, token) = Keygate::with_key(&up.url(), "heads");
    for h2 in [false, true] {
        let c = if h2 { kg.client_h2() } else { kg.client() };
        // 25 fields of 600 bytes: ~15.4 KB of head.
        let r = c
            .get(
                &kg.url("/head?fields=25&size=600"),
                &[("x-api-key", &token)],
            )
            .await;
        assert_eq!(r.status, 200, "h2={h2}");
        for i in 0..25 {
            assert_eq!(
                r.header(&format!("x-big-{i}")).map(str::len),
                Some(600),
                "field {i} (h2={h2})"
            );
        }
        // 40 fields of 600 bytes: ~24.6 KB, past the bound.
        let started = std::time::Instant::now();
        let r = c
            .get(
                &kg.url("/head?fields=40&size=600"),
                &[("x-api-key", &token)],
            )
            .await;
        assert_eq!(r.status, 502, "h2={h2}");
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "the 502 took {:?} (h2={h2})",
            started.elapsed()
        );
        let j = r.json();
        assert!(j["error"].is_string(), "{j}");
        assert!(j["request_id"].is_string(), "{j}");
        assert!(r.header("x-big-0").is_none(), "h2={h2}");
        let r = c.get(&kg.url("/"), &[("x-api-key", &token)]).await;
        assert_eq!(r.status, 200, "h2={h2}");
    }
    assert_no_secrets(&kg.logs(), &[&token]);
}
