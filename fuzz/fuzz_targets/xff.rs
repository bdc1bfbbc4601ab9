//! `AccessRules::client_ip` with arbitrary trusted-proxy lists and `X-Forwarded-For` headers.
//!
//! Properties:
//! - the result is the (canonical) peer or an address that appears in one of the headers;
//! - an untrusted peer's headers are ignored: the result is the peer;
//! - the result agrees with a plain reading of SPEC §5 (walk the hops right to left across all
//!   header lines; the first address that is not a trusted proxy is the client; an unparsable
//!   hop stops the walk at the last address reached).
//!
//! Headers are built from structured hops (addresses from the trusted list, the peer, arbitrary
//! addresses, with ports, brackets and whitespace) or taken as raw bytes.

#![no_main]

use std::net::IpAddr;

use ipnet::IpNet;
use keygate::access::{AccessRules, IpList, parse_hop};
use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
enum Hop {
    Addr(IpAddr),
    /// An address inside the n-th trusted network (so walks get past trusted hops).
    Trusted(u8),
    Peer,
    Text(String),
}

#[derive(Arbitrary, Debug)]
enum Form {
    Plain,
    Spaced,
    Bracketed,
    WithPort(u16),
    Mapped,
}

#[derive(Arbitrary, Debug)]
enum Header {
    Hops(Vec<(Hop, Form)>),
    Raw(Vec<u8>),
}

#[derive(Arbitrary, Debug)]
struct Input {
    peer: IpAddr,
    trusted: Vec<(IpAddr, u8)>,
    trust_peer: bool,
    headers: Vec<Header>,
}

fn render(ip: IpAddr, form: &Form) -> String {
    match (form, ip) {
        (Form::Plain, _) => ip.to_string(),
        (Form::Spaced, _) => format!("  {ip}\t"),
        (Form::Bracketed, IpAddr::V6(v6)) => format!("[{v6}]"),
        (Form::Bracketed, IpAddr::V4(v4)) => format!("[{v4}]"),
        (Form::WithPort(p), IpAddr::V6(v6)) => format!("[{v6}]:{p}"),
        (Form::WithPort(p), IpAddr::V4(v4)) => format!("{v4}:{p}"),
        (Form::Mapped, IpAddr::V4(v4)) => v4.to_ipv6_mapped().to_string(),
        (Form::Mapped, IpAddr::V6(v6)) => v6.to_string(),
    }
}

fuzz_target!(|input: Input| {
    let mut nets: Vec<IpNet> = input
        .trusted
        .iter()
        .take(16)
        .map(|&(ip, len)| {
            let max = if ip.is_ipv4() { 32 } else { 128 };
            IpNet::new(ip, len % (max + 1))
                .expect("prefix in range")
                .trunc()
        })
        .collect();
    if input.trust_peer {
        nets.push(IpNet::from(input.peer));
    }
    let trusted = IpList::new(nets.clone());
    let rules = AccessRules::new(IpList::default(), IpList::default(), trusted.clone());

    let headers: Vec<Vec<u8>> = input
        .headers
        .iter()
        .take(8)
        .map(|h| match h {
            Header::Raw(b) => b.clone(),
            Header::Hops(hops) => hops
                .iter()
                .take(16)
                .map(|(hop, form)| match hop {
                    Hop::Addr(ip) => render(*ip, form),
                    Hop::Peer => render(input.peer, form),
                    Hop::Trusted(n) if !nets.is_empty() => {
                        let net = nets[usize::from(*n) % nets.len()];
                        render(net.addr(), form)
                    }
                    Hop::Trusted(_) => String::new(),
                    Hop::Text(t) => t.clone(),
                })
                .collect::<Vec<_>>()
                .join(",")
                .into_bytes(),
        })
        .collect();

    let got = rules.client_ip(input.peer, headers.iter().map(Vec::as_slice));
    let peer = input.peer.to_canonical();
    assert_eq!(got, got.to_canonical(), "result is not canonical");

    if !trusted.contains(peer) {
        assert_eq!(got, peer, "an untrusted peer's X-Forwarded-For was used");
        return;
    }

    // Every address the headers hold, as the walk would read them.
    let mut seen: Vec<IpAddr> = Vec::new();
    for h in &headers {
        if let Ok(text) = std::str::from_utf8(h) {
            seen.extend(text.split(',').filter_map(parse_hop));
        }
    }
    assert!(
        got == peer || seen.contains(&got),
        "{got} is neither the peer nor in the headers"
    );

    // SPEC §5, read directly.
    let mut expected = peer;
    'walk: for h in headers.iter().rev() {
        let Ok(text) = std::str::from_utf8(h) else {
            break;
        };
        for hop in text.split(',').rev() {
            let Some(ip) = parse_hop(hop) else {
                break 'walk;
            };
            expected = ip;
            if !trusted.contains(ip) {
                break 'walk;
            }
        }
    }
    assert_eq!(got, expected);
    // Never a trusted proxy unless the walk ran out of addresses or hit garbage.
    if trusted.contains(got) {
        let untrusted_anywhere = seen.iter().any(|&ip| !trusted.contains(ip));
        let clean = headers.iter().all(|h| {
            std::str::from_utf8(h).is_ok_and(|t| t.split(',').all(|x| parse_hop(x).is_some()))
        });
        assert!(
            !(clean && untrusted_anywhere),
            "trusted {got} chosen over an untrusted hop"
        );
    }
});
