//! Upstream exposure check (SPEC §9): the service behind keygate must be reachable only
//! through keygate. When the upstream is plain HTTP on a loopback address, keygate tries the
//! same port on each of the host's other addresses at start-up, on every reload and in
//! `keygate check`. If one accepts a TCP connection, the service listens on more than loopback
//! (typically `0.0.0.0`, a container's published port, or `--host 0.0.0.0`), so anyone who can
//! reach the host can skip keygate: `upstream_exposed` is logged at warn with the address, the
//! `keygate_upstream_exposed` gauge is 1, and `check` prints a warning (exit status unchanged).
//!
//! What it tests is where the service listens, from the host itself; a firewall in front of the
//! host may still block outside access, but binding the service to 127.0.0.1 is the fix that
//! does not depend on one. An upstream that is not on loopback cannot be tested this way: the
//! network must restrict who reaches it (docs/operations.md, "Keeping the upstream private").
//!
//! Host addresses come from `/proc/net/fib_trie` (IPv4 `host LOCAL` entries) and
//! `/proc/net/if_inet6`, parsed here: no `getifaddrs` FFI (keygate forbids unsafe code) and no
//! new dependency for two small text formats. keygate targets Linux (systemd); elsewhere the
//! list is empty and the check says it could not enumerate addresses.

use std::net::{IpAddr, Ipv6Addr, SocketAddr, TcpStream};
use std::time::Duration;

/// What kind of upstream this is, for the check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// `http://` on a loopback address (or `localhost`): the port to probe.
    Loopback { port: u16 },
    /// Not on loopback (another host, or `https://`): not testable from here.
    Remote { authority: String },
}

/// Classifies an upstream URL (already validated by the config build).
pub fn target(url: &str) -> Target {
    let Ok(uri) = url.parse::<http::Uri>() else {
        return Target::Remote {
            authority: String::new(),
        };
    };
    let authority = uri
        .authority()
        .map(|a| a.as_str().to_string())
        .unwrap_or_default();
    let host = uri.host().unwrap_or_default();
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let loopback = host.eq_ignore_ascii_case("localhost")
        || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback());
    if uri.scheme() == Some(&http::uri::Scheme::HTTP) && loopback {
        Target::Loopback {
            port: uri.port_u16().unwrap_or(80),
        }
    } else {
        Target::Remote { authority }
    }
}

/// The host's own addresses other than loopback and IPv6 link-local (which needs a scope).
pub fn host_addresses() -> Vec<IpAddr> {
    let mut out = Vec::new();
    if let Ok(text) = std::fs::read_to_string("/proc/net/fib_trie") {
        out.extend(parse_fib_trie(&text));
    }
    if let Ok(text) = std::fs::read_to_string("/proc/net/if_inet6") {
        out.extend(parse_if_inet6(&text));
    }
    out.retain(|ip| !ip.is_loopback() && !ip.is_unspecified() && !is_v6_link_local(ip));
    out.sort();
    out.dedup();
    out
}

fn is_v6_link_local(ip: &IpAddr) -> bool {
    matches!(ip, IpAddr::V6(v6) if (v6.segments()[0] & 0xffc0) == 0xfe80)
}

/// IPv4 addresses of this host: the `|-- a.b.c.d` leaves followed by a `/32 host LOCAL` line.
fn parse_fib_trie(text: &str) -> Vec<IpAddr> {
    let mut out = Vec::new();
    let mut leaf: Option<IpAddr> = None;
    for line in text.lines() {
        let t = line.trim();
        if let Some(addr) = t.strip_prefix("|-- ") {
            leaf = addr.trim().parse().ok();
        } else if t.starts_with("/32 host LOCAL")
            && let Some(ip) = leaf
        {
            out.push(ip);
        }
    }
    out
}

/// `/proc/net/if_inet6`: 32 hex digits of address, then index, prefix, scope, flags, name.
fn parse_if_inet6(text: &str) -> Vec<IpAddr> {
    text.lines()
        .filter_map(|l| {
            let hex = l.split_whitespace().next()?;
            let bits = u128::from_str_radix(hex, 16).ok()?;
            (hex.len() == 32).then(|| IpAddr::V6(Ipv6Addr::from(bits)))
        })
        .collect()
}

/// What the check found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Finding {
    /// Probed `probed` addresses; these accepted a connection on the upstream's port.
    Checked {
        probed: Vec<IpAddr>,
        exposed: Vec<SocketAddr>,
    },
    /// No address other than loopback was found: nothing to probe.
    NoOtherAddresses,
    /// The upstream is not on loopback; the network has to restrict it.
    NotLoopback { authority: String },
}

/// Probes the upstream's port on every host address (blocking: at most `timeout` per address,
/// and connecting to the host's own addresses is answered at once). Run off the async workers.
pub fn check(url: &str, timeout: Duration) -> Finding {
    let port = match target(url) {
        Target::Loopback { port } => port,
        Target::Remote { authority } => return Finding::NotLoopback { authority },
    };
    let probed = host_addresses();
    if probed.is_empty() {
        return Finding::NoOtherAddresses;
    }
    let exposed = probed
        .iter()
        .map(|ip| SocketAddr::new(*ip, port))
        .filter(|addr| TcpStream::connect_timeout(addr, timeout).is_ok())
        .collect();
    Finding::Checked { probed, exposed }
}

/// Per-address timeout of the probe.
pub const PROBE_TIMEOUT: Duration = Duration::from_millis(500);

/// Runs the check and reports it in the log and the gauge (start-up and reload).
pub fn check_and_log(url: &str) {
    match check(url, PROBE_TIMEOUT) {
        Finding::Checked { exposed, probed } => {
            crate::metrics::global().set_upstream_exposed(!exposed.is_empty());
            for addr in &exposed {
                tracing::warn!(
                    event = "upstream_exposed",
                    address = %addr,
                    "the upstream's port accepts connections on this host address, so clients can bypass keygate: bind the service to 127.0.0.1 (docs/operations.md)"
                );
            }
            if exposed.is_empty() {
                tracing::debug!(
                    addresses = probed.len(),
                    "upstream exposure check: the upstream's port is closed on every other host address"
                );
            }
        }
        Finding::NoOtherAddresses => {
            crate::metrics::global().set_upstream_exposed(false);
            tracing::debug!(
                "upstream exposure check: no host address other than loopback found to probe"
            );
        }
        Finding::NotLoopback { .. } => crate::metrics::global().set_upstream_exposed(false),
    }
}

/// The lines `keygate check` prints (to stderr) about the upstream's exposure.
pub fn check_report(url: &str) -> Vec<String> {
    match check(url, PROBE_TIMEOUT) {
        Finding::Checked { exposed, .. } => exposed
            .iter()
            .map(|a| {
                format!(
                    "warning: upstream_exposed: the upstream's port also accepts connections on {a}, so clients can bypass keygate; bind the service to 127.0.0.1 only (docs/operations.md, \"Keeping the upstream private\")"
                )
            })
            .collect(),
        Finding::NoOtherAddresses => vec![
            "note: upstream exposure not checked: no host address other than loopback was found".to_string(),
        ],
        Finding::NotLoopback { authority } => vec![format!(
            "note: the upstream {authority} is not a plain-HTTP address on loopback, so keygate cannot check that it is reachable only through keygate: the network must restrict it (firewall or security group admitting only this host; docs/operations.md, \"Keeping the upstream private\")"
        )],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets() {
        assert_eq!(
            target("http://127.0.0.1:8000"),
            Target::Loopback { port: 8000 }
        );
        assert_eq!(target("http://localhost"), Target::Loopback { port: 80 });
        assert_eq!(
            target("http://[::1]:9000/base"),
            Target::Loopback { port: 9000 }
        );
        assert_eq!(target("http://127.5.0.1:81"), Target::Loopback { port: 81 });
        assert!(matches!(
            target("https://127.0.0.1:8443"),
            Target::Remote { .. }
        ));
        assert!(matches!(
            target("http://10.0.0.5:8000"),
            Target::Remote { .. }
        ));
    }

    #[test]
    fn parses_proc_files() {
        let fib = "Main:\n  +-- 0.0.0.0/0 3 0 5\n     |-- 0.0.0.0\n        /0 universe UNICAST\n     +-- 127.0.0.0/8 2 0 2\n           |-- 127.0.0.1\n              /32 host LOCAL\n     |-- 10.1.2.3\n        /32 host LOCAL\n     |-- 10.1.2.255\n        /32 link BROADCAST\n";
        assert_eq!(
            parse_fib_trie(fib),
            vec![
                "127.0.0.1".parse::<IpAddr>().unwrap(),
                "10.1.2.3".parse().unwrap()
            ]
        );
        let v6 = "00000000000000000000000000000001 01 80 10 80       lo\nfe800000000000000000000000000001 02 40 20 80     eth0\n20010db8000000000000000000000005 02 40 00 00     eth0\n";
        let got = parse_if_inet6(v6);
        assert_eq!(got.len(), 3);
        assert!(is_v6_link_local(&got[1]));
        assert_eq!(got[2], "2001:db8::5".parse::<IpAddr>().unwrap());
    }
}
