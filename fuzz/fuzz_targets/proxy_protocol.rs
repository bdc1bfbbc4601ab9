//! `proxy_protocol::parse` on arbitrary bytes and on generated v1/v2 headers.
//!
//! Properties:
//! - an accepted header consumes at least one and at most all of the input's bytes;
//! - a header re-parsed from its own bytes alone gives the same result, and so does the header
//!   followed by anything (the TLS ClientHello behind it cannot change it);
//! - every strict prefix of an accepted header is `Incomplete`, never `Invalid` or accepted: the
//!   socket reader feeds `parse` whatever has arrived, so a header split across packets must work;
//! - `Incomplete` is only said while fewer than `V2_MAX_LEN` bytes are there (no unbounded wait),
//!   and `Invalid` stays `Invalid` whatever bytes follow;
//! - generated well-formed headers parse to exactly the address they carry.

#![no_main]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use keygate::proxy_protocol::{ProxyError, V2_MAX_LEN, V2_SIGNATURE, parse};
use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
enum Input {
    Raw(Vec<u8>),
    V1 {
        v6: bool,
        src: u128,
        dst: u128,
        sport: u16,
        dport: u16,
        tail: Vec<u8>,
    },
    V2 {
        v6: bool,
        local: bool,
        src: u128,
        dst: u128,
        sport: u16,
        dport: u16,
        tlvs: Vec<u8>,
        tail: Vec<u8>,
    },
}

fn check(buf: &[u8]) {
    let res = parse(buf);
    match res {
        Ok(p) => {
            assert!(
                p.len >= 1 && p.len <= buf.len(),
                "len {} of {}",
                p.len,
                buf.len()
            );
            assert_eq!(parse(&buf[..p.len]), res, "header alone parses differently");
            let mut longer = buf[..p.len].to_vec();
            longer.extend_from_slice(b"\x16\x03\x01 trailing bytes");
            assert_eq!(parse(&longer), res, "bytes after the header change it");
            // Strict prefixes: all of them for short headers, a sample for long v2 ones.
            let step = (p.len / 64).max(1);
            for k in (0..p.len).step_by(step).chain(p.len.checked_sub(1)) {
                assert_eq!(
                    parse(&buf[..k]),
                    Err(ProxyError::Incomplete),
                    "prefix of {k} bytes"
                );
            }
        }
        Err(ProxyError::Incomplete) => {
            assert!(
                buf.len() < V2_MAX_LEN,
                "still incomplete after {} bytes",
                buf.len()
            );
        }
        Err(ProxyError::Invalid(why)) => {
            assert!(!why.is_empty());
            let mut longer = buf.to_vec();
            longer.extend_from_slice(b"\r\n\r\n\0");
            assert!(
                matches!(parse(&longer), Err(ProxyError::Invalid(_))),
                "Invalid became valid"
            );
        }
        Err(ProxyError::NotReceived(_)) => panic!("parse never says NotReceived"),
    }
}

fuzz_target!(|input: Input| {
    match input {
        Input::Raw(buf) => check(&buf),
        Input::V1 {
            v6,
            src,
            dst,
            sport,
            dport,
            tail,
        } => {
            let (proto, s, d): (_, IpAddr, IpAddr) = if v6 {
                (
                    "TCP6",
                    Ipv6Addr::from(src).into(),
                    Ipv6Addr::from(dst).into(),
                )
            } else {
                (
                    "TCP4",
                    Ipv4Addr::from(src as u32).into(),
                    Ipv4Addr::from(dst as u32).into(),
                )
            };
            let mut buf = format!("PROXY {proto} {s} {d} {sport} {dport}\r\n").into_bytes();
            let len = buf.len();
            buf.extend_from_slice(&tail);
            let p = parse(&buf).expect("a well-formed v1 header parses");
            assert_eq!(p.len, len);
            assert_eq!(p.source, Some(SocketAddr::new(s, sport)));
            check(&buf);
        }
        Input::V2 {
            v6,
            local,
            src,
            dst,
            sport,
            dport,
            tlvs,
            tail,
        } => {
            let mut addr = Vec::new();
            let (fam, s): (u8, IpAddr) = if v6 {
                addr.extend_from_slice(&src.to_be_bytes());
                addr.extend_from_slice(&dst.to_be_bytes());
                (0x21, Ipv6Addr::from(src).into())
            } else {
                addr.extend_from_slice(&(src as u32).to_be_bytes());
                addr.extend_from_slice(&(dst as u32).to_be_bytes());
                (0x11, Ipv4Addr::from(src as u32).into())
            };
            addr.extend_from_slice(&sport.to_be_bytes());
            addr.extend_from_slice(&dport.to_be_bytes());
            addr.extend_from_slice(&tlvs[..tlvs.len().min(V2_MAX_LEN - 16 - addr.len())]);
            let mut buf = V2_SIGNATURE.to_vec();
            buf.push(if local { 0x20 } else { 0x21 });
            buf.push(fam);
            buf.extend_from_slice(&(addr.len() as u16).to_be_bytes());
            buf.extend_from_slice(&addr);
            let len = buf.len();
            buf.extend_from_slice(&tail);
            let p = parse(&buf).expect("a well-formed v2 header parses");
            assert_eq!(p.len, len);
            let want = (!local).then(|| SocketAddr::new(s, sport));
            assert_eq!(p.source, want);
            check(&buf);
        }
    }
});
