//! HTTP rules an intermediary must keep (issue 8 §4, docs/http-conformance.md): the protocol
//! is the one ALPN negotiated (RFC 9113 §3.2–3.4), methods keygate does not forward, Max-Forwards
//! (RFC 9110 §7.6.2), Expect: 100-continue (§10.1.1), informational responses (§15.2), and
//! what the upstream may send back (RFC 9112 §5.2 obs-fold, header limits).

mod common;

use std::net::SocketAddr;

use common::h2raw;
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// A connection that negotiated `h2` speaks HTTP/2 only: HTTP/1.1 bytes or garbage instead of
/// the preface get SETTINGS + GOAWAY(PROTOCOL_ERROR) (RFC 9113 §3.4), never an HTTP/1.1 answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_alpn_means_http2_only() {
    let up = Upstream::start().await;
    let (token, hash) = new_key("k");
    let kg = Keygate::builder().upstream(&up).key("k", &hash, "").start();
    for bytes in [
        format!("GET / HTTP/1.1\r\nHost: localhost\r\nX-API-Key: {token}\r\n\r\n"),
        "PRI * HTTP/2.0\r\n\r\nXX\r\n\r\n".to_string(),
        "x".repeat(40),
    ] {
        let mut s = kg.tls_stream_alpn(&[b"h2"]).await;
        s.write_all(bytes.as_bytes()).await.unwrap();
        let out = read_to_close(&mut s).await;
        assert!(
            !out.starts_with(b"HTTP/"),
            "{:?}",
            String::from_utf8_lossy(&out)
        );
        // SETTINGS (9 bytes) then GOAWAY with PROTOCOL_ERROR.
        assert!(out.len() >= 9 + 17, "{out:?}");
        assert_eq!(out[3], h2raw::SETTINGS);
        let goaway = &out[9..];
        assert_eq!(goaway[3], h2raw::GOAWAY, "{out:?}");
        assert_eq!(
            &goaway[13..17],
            &h2raw::PROTOCOL_ERROR.to_be_bytes(),
            "{out:?}"
        );
    }
    assert_eq!(up.count(), 0);
    // A real HTTP/2 client is served.
    let got = kg
        .client_h2()
        .get(&kg.url("/ok"), &[("x-api-key", &token)])
        .await;
    assert_eq!((got.status, got.version), (200, http::Version::HTTP_2));
}

/// `http/1.1` or no ALPN: HTTP/1.1 only; an HTTP/2 preface is not served as HTTP/2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http11_or_no_alpn_means_http11_only() {
    let up = Upstream::start().await;
    let (token, hash) = new_key("k");
    let kg = Keygate::builder().upstream(&up).key("k", &hash, "").start();
    for alpn in [&[&b"http/1.1"[..]][..], &[]] {
        let mut io = kg.tls_stream_alpn(alpn).await;
        let authority = format!("localhost:{}", kg.addr.port());
        let mut bytes = h2raw::PREFACE.to_vec();
        bytes.extend(h2raw::frame(h2raw::SETTINGS, 0, 0, &[]));
        let block = h2raw::header_block(&[
            (":method", "GET"),
            (":scheme", "https"),
            (":authority", &authority),
            (":path", "/"),
            ("x-api-key", &token),
        ]);
        bytes.extend(h2raw::frame(h2raw::HEADERS, 0x5, 1, &block));
        // keygate may close before all of it is written: that is an answer too.
        let _ = io.write_all(&bytes).await;
        let out = read_to_close(&mut io).await;
        // Either nothing or an HTTP/1.1 error: never an HTTP/2 frame (a SETTINGS frame would
        // start with a 3-byte length and type 4).
        assert!(
            out.is_empty() || out.starts_with(b"HTTP/1.1 "),
            "{alpn:?}: {:?}",
            String::from_utf8_lossy(&out)
        );
        // And plain HTTP/1.1 works on such a connection.
        let mut s = kg.tls_stream_alpn(alpn).await;
        s.write_all(
            format!("GET /h1 HTTP/1.1\r\nHost: localhost\r\nX-API-Key: {token}\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await
        .unwrap();
        let out = read_to_close(&mut s).await;
        assert!(
            out.starts_with(b"HTTP/1.1 200"),
            "{:?}",
            String::from_utf8_lossy(&out)
        );
    }
    let uris: Vec<String> = up.requests().into_iter().map(|s| s.uri).collect();
    assert_eq!(uris, ["/h1", "/h1"]);
}

/// CONNECT and TRACE are not forwarded (501 JSON); OPTIONS with `Max-Forwards: 0` is answered
/// by keygate, with a higher value forwarded and decremented (RFC 9110 §7.6.2, §9.3.7).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_trace_and_max_forwards() {
    let up = Upstream::start().await;
    let (token, hash) = new_key("k");
    let kg = Keygate::builder().upstream(&up).key("k", &hash, "").start();
    for req in [
        format!(
            "CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\nX-API-Key: {token}\r\n\r\n"
        ),
        format!(
            "TRACE / HTTP/1.1\r\nHost: localhost\r\nX-API-Key: {token}\r\nConnection: close\r\n\r\n"
        ),
    ] {
        let mut s = kg.tls_stream().await;
        s.write_all(req.as_bytes()).await.unwrap();
        let mut out = vec![0u8; 12];
        s.read_exact(&mut out).await.unwrap();
        assert_eq!(&out, b"HTTP/1.1 501", "{req}");
    }
    let c = kg.client();
    let opt = |mf: &'static str| {
        http::Request::builder()
            .method("OPTIONS")
            .uri(kg.url("/opt"))
            .header("x-api-key", &token)
            .header("max-forwards", mf)
            .body(empty())
            .unwrap()
    };
    let got = c.send(opt("0")).await;
    assert_eq!(got.status, 200);
    assert!(got.header("allow").is_some_and(|a| a.contains("GET")));
    assert_eq!(up.count(), 0);
    assert_eq!(c.send(opt("3")).await.status, 200);
    assert_eq!(up.requests()[0].header("max-forwards"), Some("2"));
}

/// Expect: 100-continue (RFC 9110 §10.1.1): a refused request gets its final answer without
/// `100 Continue` (the body is never asked for); an admitted one gets 100, then the answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expect_continue_only_after_the_checks() {
    let up = Upstream::start().await;
    let (token, hash) = new_key("k");
    let kg = Keygate::builder().upstream(&up).key("k", &hash, "").start();
    let head = |key: &str| {
        format!(
            "POST /upload HTTP/1.1\r\nHost: localhost\r\nX-API-Key: {key}\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n"
        )
    };
    let mut s = kg.tls_stream().await;
    s.write_all(head("kg_x_wrong").as_bytes()).await.unwrap();
    let mut first = vec![0u8; 12];
    s.read_exact(&mut first).await.unwrap();
    assert_eq!(&first, b"HTTP/1.1 401");

    let mut s = kg.tls_stream().await;
    s.write_all(head(&token).as_bytes()).await.unwrap();
    let mut first = vec![0u8; 12];
    s.read_exact(&mut first).await.unwrap();
    assert_eq!(&first, b"HTTP/1.1 100");
    s.write_all(b"hello").await.unwrap();
    let mut rest = Vec::new();
    while !String::from_utf8_lossy(&rest).contains("HTTP/1.1 200") {
        rest.push(s.read_u8().await.unwrap());
    }
    assert_eq!(up.requests()[0].body_len, 5);
}

/// An upstream that writes `response` (raw bytes) to every request.
async fn raw_upstream(response: Vec<u8>) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let response = response.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                while !head.ends_with(b"\r\n\r\n") {
                    let Ok(b) = s.read_u8().await else { return };
                    head.push(b);
                }
                let _ = s.write_all(&response).await;
                let _ = s.shutdown().await;
            });
        }
    });
    (addr, task)
}

/// 1xx from the upstream (103 Early Hints): hyper's server cannot send informational responses
/// (hyper 1.x answers a 1xx Response with 500; HTTP/2 support is the open PR
/// hyperium/hyper#4114), so keygate does not relay them; the final response must still arrive
/// intact on both protocols (docs/http-conformance.md).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn early_hints_do_not_break_the_final_response() {
    let (addr, _t) = raw_upstream(
        b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n\
          HTTP/1.1 200 OK\r\nContent-Length: 5\r\nLink: </style.css>; rel=preload\r\n\r\nfinal"
            .to_vec(),
    )
    .await;
    let (kg, token) = Keygate::with_key(&format!("http://{addr}"), "k");
    for c in [kg.client(), kg.client_h2()] {
        let got = c.get(&kg.url("/"), &[("x-api-key", &token)]).await;
        assert_eq!((got.status, got.text().as_str()), (200, "final"));
        assert_eq!(got.header("link"), Some("</style.css>; rel=preload"));
    }
}

/// RFC 9112 §5.2: a proxy receiving obs-fold in a response must reject it or unfold it; keygate
/// answers 502. More than 100 response header lines: 502 too (hyper's client limit).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_upstream_responses_are_bad_gateway() {
    let mut many = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n".to_vec();
    for i in 0..150 {
        many.extend_from_slice(format!("X-H{i}: v\r\n").as_bytes());
    }
    many.extend_from_slice(b"\r\nok");
    for response in [
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Folded: a\r\n b\r\n\r\nok".to_vec(),
        many,
    ] {
        let (addr, _t) = raw_upstream(response).await;
        let (kg, token) = Keygate::with_key(&format!("http://{addr}"), "k");
        let got = kg
            .client()
            .get(&kg.url("/"), &[("x-api-key", &token)])
            .await;
        assert_eq!(got.status, 502, "{}", got.text());
    }
}
