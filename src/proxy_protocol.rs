//! PROXY protocol v1 (text) and v2 (binary) on the listener, for keygate behind an L4 load
//! balancer (`[server] proxy_protocol = true`). Its place in the request path is first of all:
//!
//! ```text
//! accept ─ peer is a trusted proxy? ─ PROXY header ─ client-IP gate ─ TLS ─ HTTP ─ pipeline
//! ```
//!
//! The source address in the header replaces the TCP peer for everything after it (allow/deny,
//! client IP, logs). Only `[access] trusted_proxies` may send one; the server closes any other
//! connection before reading a byte, and any connection whose header is absent, malformed or slow.
//!
//! [`parse`] is pure and total (fuzzable): it looks at the bytes received so far and says whether
//! they hold a complete header, need more bytes, or can never become a valid header.
//! [`read_header`] drives it over a socket without ever consuming a byte past the header, so the
//! TLS ClientHello that follows is left for rustls.
//!
//! Strictness, per the specification (haproxy.org/download/3.0/doc/proxy-protocol.txt):
//! v1 is `PROXY TCP4|TCP6 <src> <dst> <sport> <dport>\r\n` or `PROXY UNKNOWN…\r\n`, at most 107
//! bytes, single spaces, addresses of the announced family, ports 0–65535 without leading zeros.
//! v2 is the 12-byte signature, version 2, command LOCAL or PROXY, family UNSPEC, INET or INET6
//! over STREAM; TLVs are skipped. A v2 header longer than [`V2_MAX_LEN`] is refused: TLVs from
//! real load balancers are a few dozen bytes, and the bound keeps the read small.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use tokio::io::AsyncReadExt as _;
use tokio::net::TcpStream;

/// The v2 signature: `\r\n\r\n\0\r\nQUIT\n`.
pub const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// Longest v1 header, CRLF included (the specification's bound).
pub const V1_MAX_LEN: usize = 107;
/// Longest v2 header accepted: 16 fixed bytes and up to 4 KiB of addresses and TLVs.
pub const V2_MAX_LEN: usize = 16 + 4096;

/// A complete header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Parsed {
    /// Bytes the header occupies at the start of the stream.
    pub len: usize,
    /// The original client's address; `None` for v2 `LOCAL` (the balancer's own health check),
    /// v1 `UNKNOWN` and v2 `UNSPEC`: the TCP peer stays the peer.
    pub source: Option<SocketAddr>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ProxyError {
    /// A valid prefix of a header: more bytes are needed.
    #[error("incomplete PROXY protocol header")]
    Incomplete,
    /// These bytes can never start a valid header.
    #[error("invalid PROXY protocol header: {0}")]
    Invalid(&'static str),
    /// The connection ended, or the header did not arrive in time.
    #[error("PROXY protocol header not received: {0}")]
    NotReceived(&'static str),
}

/// Parses a header at the start of `buf` (which may hold more bytes after it).
pub fn parse(buf: &[u8]) -> Result<Parsed, ProxyError> {
    if buf.is_empty() {
        return Err(ProxyError::Incomplete);
    }
    // Decide the version on the bytes there are: a prefix of both signatures is just incomplete.
    let n = buf.len().min(V2_SIGNATURE.len());
    if buf[..n] == V2_SIGNATURE[..n] {
        if n < V2_SIGNATURE.len() {
            return Err(ProxyError::Incomplete);
        }
        return parse_v2(buf);
    }
    let n = buf.len().min(6);
    if buf[..n] == b"PROXY "[..n] {
        if n < 6 {
            return Err(ProxyError::Incomplete);
        }
        return parse_v1(buf);
    }
    Err(ProxyError::Invalid("no PROXY protocol signature"))
}

fn parse_v1(buf: &[u8]) -> Result<Parsed, ProxyError> {
    let window = &buf[..buf.len().min(V1_MAX_LEN)];
    let Some(cr) = window.iter().position(|&b| b == b'\r') else {
        if window.iter().any(|&b| b == b'\n' || !is_v1_char(b)) {
            return Err(ProxyError::Invalid("v1: unexpected byte"));
        }
        return if buf.len() >= V1_MAX_LEN {
            Err(ProxyError::Invalid("v1: longer than 107 bytes"))
        } else {
            Err(ProxyError::Incomplete)
        };
    };
    let line = &window[..cr];
    if line.iter().any(|&b| !is_v1_char(b)) {
        return Err(ProxyError::Invalid("v1: unexpected byte"));
    }
    match window.get(cr + 1) {
        Some(b'\n') => {}
        Some(_) => return Err(ProxyError::Invalid("v1: CR without LF")),
        None if buf.len() >= V1_MAX_LEN => {
            return Err(ProxyError::Invalid("v1: longer than 107 bytes"));
        }
        None => return Err(ProxyError::Incomplete),
    }
    let len = cr + 2;
    // Printable ASCII only (checked above), so this cannot fail.
    let line = std::str::from_utf8(line).map_err(|_| ProxyError::Invalid("v1: not ASCII"))?;
    let rest = &line["PROXY ".len()..];
    if rest == "UNKNOWN" || rest.starts_with("UNKNOWN ") {
        // The sender could not tell; the rest of the line is to be ignored.
        return Ok(Parsed { len, source: None });
    }
    let mut fields = rest.split(' ');
    let (Some(proto), Some(src), Some(dst), Some(sport), Some(dport), None) = (
        fields.next(),
        fields.next(),
        fields.next(),
        fields.next(),
        fields.next(),
        fields.next(),
    ) else {
        return Err(ProxyError::Invalid("v1: wrong number of fields"));
    };
    // The destination is validated (strictness) but not used.
    let (src, _dst): (IpAddr, IpAddr) = match proto {
        "TCP4" => (
            src.parse::<Ipv4Addr>()
                .map_err(|_| ProxyError::Invalid("v1: bad IPv4 source"))?
                .into(),
            dst.parse::<Ipv4Addr>()
                .map_err(|_| ProxyError::Invalid("v1: bad IPv4 destination"))?
                .into(),
        ),
        "TCP6" => (
            src.parse::<Ipv6Addr>()
                .map_err(|_| ProxyError::Invalid("v1: bad IPv6 source"))?
                .into(),
            dst.parse::<Ipv6Addr>()
                .map_err(|_| ProxyError::Invalid("v1: bad IPv6 destination"))?
                .into(),
        ),
        _ => return Err(ProxyError::Invalid("v1: unknown protocol")),
    };
    let sport = parse_port(sport).ok_or(ProxyError::Invalid("v1: bad source port"))?;
    parse_port(dport).ok_or(ProxyError::Invalid("v1: bad destination port"))?;
    Ok(Parsed {
        len,
        source: Some(SocketAddr::new(src, sport)),
    })
}

/// Printable ASCII (space to `~`), the only bytes a v1 line may hold.
fn is_v1_char(b: u8) -> bool {
    (b' '..=b'~').contains(&b)
}

/// A decimal port, 0–65535, no sign, no leading zero.
fn parse_port(s: &str) -> Option<u16> {
    if s.is_empty() || s.len() > 5 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    if s.len() > 1 && s.starts_with('0') {
        return None;
    }
    s.parse().ok()
}

fn parse_v2(buf: &[u8]) -> Result<Parsed, ProxyError> {
    let Some(&ver_cmd) = buf.get(12) else {
        return Err(ProxyError::Incomplete);
    };
    if ver_cmd >> 4 != 2 {
        return Err(ProxyError::Invalid("v2: unsupported version"));
    }
    let local = match ver_cmd & 0x0f {
        0 => true,
        1 => false,
        _ => return Err(ProxyError::Invalid("v2: unknown command")),
    };
    let Some(&fam) = buf.get(13) else {
        return Err(ProxyError::Incomplete);
    };
    let (family, proto) = (fam >> 4, fam & 0x0f);
    if family > 3 || proto > 2 {
        return Err(ProxyError::Invalid("v2: unknown family or protocol"));
    }
    let Some(len_bytes) = buf.get(14..16) else {
        return Err(ProxyError::Incomplete);
    };
    let addr_len = usize::from(u16::from_be_bytes([len_bytes[0], len_bytes[1]]));
    let len = 16 + addr_len;
    if len > V2_MAX_LEN {
        return Err(ProxyError::Invalid("v2: header too long"));
    }
    // Reject what can never be valid before waiting for the rest.
    let need = match (local, family, proto) {
        (true, _, _) | (false, 0, _) => 0,
        (false, 1, 1) => 12,
        (false, 2, 1) => 36,
        (false, 3, _) => return Err(ProxyError::Invalid("v2: AF_UNIX source")),
        (false, _, _) => return Err(ProxyError::Invalid("v2: not a stream (TCP) connection")),
    };
    if addr_len < need {
        return Err(ProxyError::Invalid("v2: address block too short"));
    }
    let Some(addr) = buf.get(16..len) else {
        return Err(ProxyError::Incomplete);
    };
    // LOCAL: the balancer speaks for itself (health checks); the address block is ignored.
    let source = match (local, family) {
        (true, _) | (false, 0) => None,
        (false, 1) => {
            let ip = Ipv4Addr::new(addr[0], addr[1], addr[2], addr[3]);
            Some(SocketAddr::new(
                ip.into(),
                u16::from_be_bytes([addr[8], addr[9]]),
            ))
        }
        _ => {
            let mut octets = [0u8; 16];
            octets.copy_from_slice(&addr[..16]);
            Some(SocketAddr::new(
                Ipv6Addr::from(octets).into(),
                u16::from_be_bytes([addr[32], addr[33]]),
            ))
        }
    };
    Ok(Parsed { len, source })
}

/// Reads one header from `stream` within `timeout`, consuming exactly its bytes. `Ok(None)`: the
/// header carries no address (LOCAL, UNKNOWN), so the TCP peer stays the peer.
///
/// The socket is peeked, never over-read: bytes that are not yet a complete header are all
/// header bytes (else [`parse`] would have said so) and are consumed; the complete header is
/// consumed exactly. At most [`V2_MAX_LEN`] bytes are ever held.
pub async fn read_header(
    stream: &mut TcpStream,
    timeout: Duration,
) -> Result<Option<SocketAddr>, ProxyError> {
    let read = async {
        let mut head: Vec<u8> = Vec::with_capacity(V1_MAX_LEN);
        let mut peeked = vec![0u8; 512];
        loop {
            let n = stream
                .peek(&mut peeked)
                .await
                .map_err(|_| ProxyError::NotReceived("connection error"))?;
            if n == 0 {
                return Err(ProxyError::NotReceived("connection closed"));
            }
            let before = head.len();
            head.extend_from_slice(&peeked[..n]);
            match parse(&head) {
                Ok(p) => {
                    // The bytes before were an incomplete header, so it ends after them.
                    let take = p
                        .len
                        .checked_sub(before)
                        .ok_or(ProxyError::Invalid("inconsistent header"))?;
                    stream
                        .read_exact(&mut peeked[..take])
                        .await
                        .map_err(|_| ProxyError::NotReceived("connection error"))?;
                    return Ok(p.source);
                }
                Err(ProxyError::Incomplete) => {
                    stream
                        .read_exact(&mut peeked[..n])
                        .await
                        .map_err(|_| ProxyError::NotReceived("connection error"))?;
                }
                Err(e) => return Err(e),
            }
        }
    };
    tokio::time::timeout(timeout, read)
        .await
        .map_err(|_| ProxyError::NotReceived("timed out"))?
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v2(cmd: u8, fam: u8, addr: &[u8]) -> Vec<u8> {
        let mut h = V2_SIGNATURE.to_vec();
        h.push(0x20 | cmd);
        h.push(fam);
        h.extend_from_slice(&(addr.len() as u16).to_be_bytes());
        h.extend_from_slice(addr);
        h
    }

    fn v4_block(src: [u8; 4], sport: u16) -> Vec<u8> {
        let mut a = src.to_vec();
        a.extend_from_slice(&[10, 0, 0, 1]);
        a.extend_from_slice(&sport.to_be_bytes());
        a.extend_from_slice(&443u16.to_be_bytes());
        a
    }

    #[test]
    fn v1_tcp4_tcp6_unknown() {
        let h = b"PROXY TCP4 203.0.113.9 10.0.0.1 56324 443\r\n\x16\x03\x01";
        let p = parse(h).unwrap();
        assert_eq!(p.len, h.len() - 3);
        assert_eq!(p.source, Some("203.0.113.9:56324".parse().unwrap()));

        let h = b"PROXY TCP6 2001:db8::7 2001:db8::1 65535 443\r\n";
        let p = parse(h).unwrap();
        assert_eq!(p.len, h.len());
        assert_eq!(p.source, Some("[2001:db8::7]:65535".parse().unwrap()));

        assert_eq!(
            parse(b"PROXY UNKNOWN\r\n").unwrap(),
            Parsed {
                len: 15,
                source: None
            }
        );
        let p = parse(b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\nrest").unwrap();
        assert_eq!((p.len, p.source), (35, None));
    }

    #[test]
    fn v1_prefixes_are_incomplete() {
        let h = b"PROXY TCP4 203.0.113.9 10.0.0.1 56324 443\r\n";
        for i in 0..h.len() {
            assert_eq!(parse(&h[..i]), Err(ProxyError::Incomplete), "{i}");
        }
    }

    #[test]
    fn v1_rejects() {
        for bad in [
            &b"GET / HTTP/1.1\r\n"[..],
            b"\x16\x03\x01\x02\x00",
            b"PROXY TCP4 203.0.113.9 10.0.0.1 56324 443\n",
            b"PROXY TCP4 203.0.113.9 10.0.0.1 56324 443\rX",
            b"PROXY TCP4 203.0.113.9  10.0.0.1 56324 443\r\n",
            b"PROXY TCP4 203.0.113.9 10.0.0.1 56324\r\n",
            b"PROXY TCP4 203.0.113.9 10.0.0.1 56324 443 7\r\n",
            b"PROXY TCP4 2001:db8::1 10.0.0.1 1 443\r\n",
            b"PROXY TCP6 203.0.113.9 2001:db8::1 1 443\r\n",
            b"PROXY TCP4 999.0.113.9 10.0.0.1 1 443\r\n",
            b"PROXY TCP4 203.0.113.9 10.0.0.1 65536 443\r\n",
            b"PROXY TCP4 203.0.113.9 10.0.0.1 0443 443\r\n",
            b"PROXY TCP4 203.0.113.9 10.0.0.1 +443 443\r\n",
            b"PROXY TCP4 203.0.113.9 10.0.0.1 1 443 \r\n",
            b"PROXY UDP4 203.0.113.9 10.0.0.1 1 443\r\n",
            b"PROXY tcp4 203.0.113.9 10.0.0.1 1 443\r\n",
            b"PROXY UNKNOWNX\r\n",
            b"PROXY TCP4 203.0.113.9\x00 10.0.0.1 1 443\r\n",
            b"PROXY\r\n",
            b"proxy TCP4 1.2.3.4 1.2.3.4 1 1\r\n",
        ] {
            assert!(
                matches!(parse(bad), Err(ProxyError::Invalid(_))),
                "{:?} → {:?}",
                String::from_utf8_lossy(bad),
                parse(bad)
            );
        }
        // 107 bytes at most, CRLF included.
        let mut long = b"PROXY UNKNOWN ".to_vec();
        long.resize(105, b'x');
        long.extend_from_slice(b"\r\n");
        assert_eq!(parse(&long).unwrap().len, 107);
        let mut longer = b"PROXY UNKNOWN ".to_vec();
        longer.resize(106, b'x');
        assert_eq!(parse(&longer), Err(ProxyError::Incomplete));
        longer.extend_from_slice(b"\r\n");
        assert!(matches!(parse(&longer), Err(ProxyError::Invalid(_))));
        let mut no_end = b"PROXY UNKNOWN ".to_vec();
        no_end.resize(300, b'x');
        assert!(matches!(parse(&no_end), Err(ProxyError::Invalid(_))));
    }

    #[test]
    fn v2_proxy_local_and_tlvs() {
        let h = v2(1, 0x11, &v4_block([203, 0, 113, 9], 40000));
        let p = parse(&h).unwrap();
        assert_eq!(p.len, 28);
        assert_eq!(p.source, Some("203.0.113.9:40000".parse().unwrap()));

        let mut a = Vec::new();
        a.extend_from_slice(&"2001:db8::7".parse::<Ipv6Addr>().unwrap().octets());
        a.extend_from_slice(&"2001:db8::1".parse::<Ipv6Addr>().unwrap().octets());
        a.extend_from_slice(&1234u16.to_be_bytes());
        a.extend_from_slice(&443u16.to_be_bytes());
        // A TLV (PP2_TYPE_AUTHORITY) after the addresses is skipped.
        a.extend_from_slice(&[0x02, 0x00, 0x04]);
        a.extend_from_slice(b"host");
        let mut h = v2(1, 0x21, &a);
        let total = h.len();
        h.extend_from_slice(b"\x16\x03\x01");
        let p = parse(&h).unwrap();
        assert_eq!(p.len, total);
        assert_eq!(p.source, Some("[2001:db8::7]:1234".parse().unwrap()));

        // LOCAL (health check), with or without an address block: no source.
        assert_eq!(
            parse(&v2(0, 0x00, &[])).unwrap(),
            Parsed {
                len: 16,
                source: None
            }
        );
        let p = parse(&v2(0, 0x11, &v4_block([1, 2, 3, 4], 5))).unwrap();
        assert_eq!((p.len, p.source), (28, None));
        // PROXY with AF_UNSPEC: unknown origin, keep the peer.
        assert_eq!(parse(&v2(1, 0x00, &[])).unwrap().source, None);
    }

    #[test]
    fn v2_prefixes_are_incomplete_and_rejects() {
        let h = v2(1, 0x11, &v4_block([203, 0, 113, 9], 40000));
        for i in 0..h.len() {
            assert_eq!(parse(&h[..i]), Err(ProxyError::Incomplete), "{i}");
        }
        let invalid = |h: &[u8]| matches!(parse(h), Err(ProxyError::Invalid(_)));
        let mut bad_version = h.clone();
        bad_version[12] = 0x11;
        assert!(invalid(&bad_version));
        let mut bad_cmd = h.clone();
        bad_cmd[12] = 0x22;
        assert!(invalid(&bad_cmd));
        assert!(invalid(&v2(1, 0x12, &v4_block([1, 2, 3, 4], 5))), "UDP");
        assert!(invalid(&v2(1, 0x31, &[0u8; 216])), "AF_UNIX");
        assert!(invalid(&v2(1, 0x41, &[0u8; 12])), "unknown family");
        assert!(invalid(&v2(1, 0x11, &[0u8; 11])), "short IPv4 block");
        assert!(invalid(&v2(1, 0x21, &[0u8; 35])), "short IPv6 block");
        // Too long is refused on the length field alone, before the bytes arrive.
        let mut huge = V2_SIGNATURE.to_vec();
        huge.extend_from_slice(&[0x21, 0x11, 0xff, 0xff]);
        assert!(invalid(&huge));
        // A corrupted signature is not a header at all.
        let mut sig = h.clone();
        sig[11] = b'X';
        assert!(invalid(&sig));
    }

    #[test]
    fn parse_never_panics_on_truncations_and_noise() {
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let base_v1 = b"PROXY TCP6 2001:db8::7 2001:db8::1 65535 443\r\n".to_vec();
        let base_v2 = v2(1, 0x11, &v4_block([203, 0, 113, 9], 40000));
        for _ in 0..20_000 {
            let mut b = if next() % 2 == 0 {
                base_v1.clone()
            } else {
                base_v2.clone()
            };
            let flips = next() % 4;
            for _ in 0..flips {
                let i = (next() as usize) % b.len();
                b[i] = next() as u8;
            }
            b.truncate((next() as usize) % (b.len() + 1));
            if let Ok(p) = parse(&b) {
                assert!(p.len <= b.len());
            }
        }
    }

    #[tokio::test]
    async fn read_header_consumes_exactly_the_header() {
        use tokio::io::AsyncWriteExt as _;
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let client = tokio::spawn(async move {
            let mut c = TcpStream::connect(addr).await.unwrap();
            // Split across writes to exercise the incomplete path.
            c.write_all(b"PROXY TCP4 203.0.113.9 ").await.unwrap();
            c.flush().await.unwrap();
            tokio::time::sleep(Duration::from_millis(50)).await;
            c.write_all(b"10.0.0.1 1 443\r\nHELLO").await.unwrap();
            c
        });
        let (mut s, _) = l.accept().await.unwrap();
        let src = read_header(&mut s, Duration::from_secs(5)).await.unwrap();
        assert_eq!(src, Some("203.0.113.9:1".parse().unwrap()));
        let mut rest = [0u8; 5];
        s.read_exact(&mut rest).await.unwrap();
        assert_eq!(&rest, b"HELLO");
        drop(client.await.unwrap());

        // Silence is bounded by the timeout.
        let c = TcpStream::connect(addr).await.unwrap();
        let (mut s, _) = l.accept().await.unwrap();
        let e = read_header(&mut s, Duration::from_millis(100))
            .await
            .unwrap_err();
        assert_eq!(e, ProxyError::NotReceived("timed out"));
        drop(c);
    }
}
