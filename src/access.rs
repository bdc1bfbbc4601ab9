//! Who may reach the upstream from where, and for what: client-IP resolution (trusted proxies and
//! `X-Forwarded-For`), global allow/deny lists, per-key allowlists and per-key scopes.

use std::borrow::Cow;
use std::net::IpAddr;

use http::Method;
use ipnet::IpNet;

/// A list of networks. IPv4-mapped IPv6 addresses are matched as IPv4.
#[derive(Debug, Clone, Default)]
pub struct IpList(Vec<IpNet>);

impl IpList {
    pub fn new(nets: Vec<IpNet>) -> Self {
        IpList(nets)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether some address is in both lists (two networks overlap when one holds the other's
    /// first address).
    pub fn overlaps(&self, other: &IpList) -> bool {
        self.0.iter().any(|a| {
            other
                .0
                .iter()
                .any(|b| a.contains(&b.network()) || b.contains(&a.network()))
        })
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.0.iter().any(|n| n.contains(&ip))
    }
}

/// The global `[access]` rules.
#[derive(Debug, Clone, Default)]
pub struct AccessRules {
    allow: IpList,
    deny: IpList,
    /// The TCP peers that may say who the client is: by `X-Forwarded-For`, or, with
    /// `[server] proxy_protocol`, by a PROXY protocol header (the load balancers).
    trusted_proxies: IpList,
    /// The peers whose `X-Forwarded-For` is believed, as the pipeline sees its peer (the
    /// address a PROXY header named, behind the PROXY protocol): `trusted_proxies`, or with
    /// the PROXY protocol `[access] trusted_http_proxies` (fresh user T8-10: one list for both
    /// hops let any client inside the balancers' range name its own address).
    forwarders: IpList,
}

impl AccessRules {
    pub fn new(allow: IpList, deny: IpList, trusted_proxies: IpList) -> Self {
        AccessRules {
            allow,
            deny,
            forwarders: trusted_proxies.clone(),
            trusted_proxies,
        }
    }

    /// Behind the PROXY protocol: `trusted_proxies` are the load balancers that send the
    /// header, and only a client the header names inside `http_proxies` (HTTP proxies in front
    /// of the balancer, e.g. a CDN) has its `X-Forwarded-For` believed.
    #[must_use]
    pub fn behind_proxy_protocol(mut self, http_proxies: IpList) -> Self {
        self.forwarders = http_proxies;
        self
    }

    /// Whether a network is in both `trusted_proxies` and the HTTP proxies behind the PROXY
    /// protocol: a client inside it, reaching keygate through the balancer, could name its own
    /// address (fresh user T9-1: T8-10's configuration in another spelling).
    pub fn http_proxies_overlap_balancers(&self) -> bool {
        self.forwarders.overlaps(&self.trusted_proxies)
    }

    /// A TCP peer that may send a PROXY protocol header (`[access] trusted_proxies`).
    pub fn is_balancer(&self, ip: IpAddr) -> bool {
        self.trusted_proxies.contains(ip)
    }

    /// Deny wins; an empty allow list admits everyone.
    pub fn admits(&self, ip: IpAddr) -> bool {
        !self.deny.contains(ip) && (self.allow.is_empty() || self.allow.contains(ip))
    }

    /// With no trusted proxies the TCP peer is the client, so the decision is made at accept,
    /// before any TLS work. Otherwise the peer is (maybe) a proxy and the decision waits for the
    /// request's `X-Forwarded-For`.
    pub fn decide_at_accept(&self) -> bool {
        self.trusted_proxies.is_empty()
    }

    /// Whether `ip`, the peer as the pipeline sees it, is a proxy whose `X-Forwarded-For` is
    /// believed (and appended to).
    pub fn is_trusted_proxy(&self, ip: IpAddr) -> bool {
        self.forwarders.contains(ip)
    }

    /// SPEC §5: the TCP peer, unless it is a trusted proxy; then the right-most address in
    /// `X-Forwarded-For` that is not a trusted proxy. An unparsable hop stops the walk (it cannot
    /// be trusted further) and the last trusted hop is used.
    pub fn client_ip<'a>(
        &self,
        peer: IpAddr,
        xff: impl DoubleEndedIterator<Item = &'a [u8]>,
    ) -> IpAddr {
        let peer = peer.to_canonical();
        if !self.is_trusted_proxy(peer) {
            return peer;
        }
        let mut client = peer;
        for header in xff.rev() {
            let Ok(text) = std::str::from_utf8(header) else {
                return client;
            };
            for hop in text.rsplit(',') {
                let Some(ip) = parse_hop(hop) else {
                    return client;
                };
                client = ip;
                if !self.is_trusted_proxy(ip) {
                    return ip;
                }
            }
        }
        client
    }
}

/// One `X-Forwarded-For` element: an address, optionally `[v6]`, `v4:port` or `[v6]:port`.
pub fn parse_hop(hop: &str) -> Option<IpAddr> {
    let hop = hop.trim();
    if let Ok(ip) = hop.parse::<IpAddr>() {
        return Some(ip.to_canonical());
    }
    if let Ok(sa) = hop.parse::<std::net::SocketAddr>() {
        return Some(sa.ip().to_canonical());
    }
    let inner = hop.strip_prefix('[')?.strip_suffix(']')?;
    inner.parse::<IpAddr>().ok().map(|ip| ip.to_canonical())
}

/// A key's scope: allowed methods and path prefixes. `None` means unrestricted.
#[derive(Debug, Clone, Default)]
pub struct Scope {
    methods: Option<Vec<Method>>,
    paths: Option<Vec<String>>,
}

impl Scope {
    pub fn new(methods: Option<Vec<Method>>, paths: Option<Vec<String>>) -> Self {
        Scope { methods, paths }
    }

    /// The allowed methods (`None`: any).
    pub fn methods(&self) -> Option<&[Method]> {
        self.methods.as_deref()
    }

    /// The allowed path prefixes, normalised (`None`: any).
    pub fn paths(&self) -> Option<&[String]> {
        self.paths.as_deref()
    }

    /// Whether `method` and the raw request-target `path` lie inside this scope. The path must
    /// lie inside it however an origin server reads it ([`every_reading`]): a path that one
    /// server would resolve outside the prefixes is refused even if another would not.
    pub fn permits(&self, method: &Method, path: &str) -> bool {
        if let Some(ms) = &self.methods
            && !ms.contains(method)
        {
            return false;
        }
        let Some(prefixes) = &self.paths else {
            return true;
        };
        every_reading(path, |p| prefixes.iter().any(|pre| path_has_prefix(p, pre)))
    }

    /// Whether a method override in the query permits the method the application will run:
    /// Laravel/Symfony (on by default) and Express `method-override` with a query getter read
    /// `_method` from a POST's query string, so `POST /items/1?_method=DELETE` is a DELETE to
    /// them (a fresh user, T5-15: a GET/POST key deleted). For a key with a `methods` scope,
    /// every `_method` parameter (any case, percent-encoded up to 3 times) must name a method
    /// in it. The header forms are removed (`proto::MANAGED_FIELDS`); a `_method` field in a
    /// form *body* is the application's to disable (README "Scopes").
    pub fn permits_overrides(&self, query: Option<&str>) -> bool {
        let (Some(ms), Some(q)) = (&self.methods, query) else {
            return true;
        };
        method_overrides(q).all(|m| m.is_some_and(|m| ms.contains(&m)))
    }
}

/// Every `_method` parameter of a query, as the method an application with a method override
/// would run: `None` for a value that is no method. A name counts in every spelling a server
/// reads as `_method` ([`names_method_override`]: any case, percent-encoded up to 3 times,
/// PHP's name mangling). Empty, and no allocation, for a query with neither "method" nor a
/// `%` in it. Used by scopes ([`Scope::permits_overrides`]) and quota costs
/// (`quota::CostTable::cost`).
pub fn method_overrides(q: &str) -> impl Iterator<Item = Option<Method>> + '_ {
    // Cheap test first: "method" spelled out, or escapes that could spell it (`_%6Dethod`).
    let any = q.contains('%')
        || q.as_bytes()
            .windows(6)
            .any(|w| w.eq_ignore_ascii_case(b"method"));
    q.split(['&', ';'])
        .filter(move |_| any)
        .filter_map(move |pair| {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            if !names_method_override(name) {
                return None;
            }
            let v = decode_up_to_3(value).trim().to_ascii_uppercase();
            Some(Method::from_bytes(v.as_bytes()).ok())
        })
}

fn decode_up_to_3(s: &str) -> std::borrow::Cow<'_, str> {
    let mut d = std::borrow::Cow::Borrowed(s);
    for _ in 0..3 {
        if !d.contains('%') && !d.contains('+') {
            break;
        }
        d = std::borrow::Cow::Owned(crate::log::percent_decode_lossy(&d));
    }
    d
}

/// Whether a query parameter name is read as `_method` by some server, after percent-decoding
/// (up to 3 times) and ASCII case folding: PHP (Laravel, Symfony) reads a name as a C string
/// (up to its first NUL: `_method%00x`), drops leading spaces, turns `.`, ` ` and an unclosed
/// `[` into `_` (`.method`, `%20.method`), and reads `_method[…]` as `_method` (fresh user
/// T8-8: each of these ran DELETE for a GET/POST key). Surrounding white space is ignored.
pub fn names_method_override(name: &str) -> bool {
    let d = decode_up_to_3(name);
    let d = d.split('\0').next().unwrap_or_default().trim();
    let d = d
        .split_once('[')
        .filter(|(_, rest)| rest.contains(']'))
        .map_or(d, |(head, _)| head);
    d.len() == 7
        && d.bytes().zip(b"_method").all(|(a, b)| {
            let a = match a {
                b'.' | b' ' | b'[' => b'_',
                a => a.to_ascii_lowercase(),
            };
            a == *b
        })
}

/// Segment-aware prefix match: `/v1` matches `/v1` and `/v1/x`, not `/v1admin`.
pub fn path_has_prefix(path: &str, prefix: &str) -> bool {
    path.starts_with(prefix)
        && (prefix.ends_with('/')
            || path.len() == prefix.len()
            || path.as_bytes()[prefix.len()] == b'/')
}

/// How an origin server may read a request path. RFC 3986 leaves room for servers to differ,
/// and a scope decision taken on one reading while the upstream uses another is the classic
/// proxy bypass (e.g. `/public/..;/admin`, which Tomcat, Jetty and Spring serve as `/admin`).
/// So keygate computes every reading and a path-dependent decision must hold under each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathReading {
    /// Dot-segments removed as RFC 3986 §5.2.4 says: only a segment that is exactly `.` or
    /// `..` is one.
    Rfc3986,
    /// As Java servlet containers read it: each segment's path parameters (from the first
    /// `;`, RFC 3986 §3.3) are removed, then dot-segments; so `..;x` is `..` and `a;x` is `a`.
    PathParameters,
    /// As a server that routes on the path as sent reads it (Node's `new URL(req.url, base)`,
    /// Express, catch-all routes such as FastAPI's `/x/{rest:path}`): escapes decoded except
    /// `%2F` and `%5C`, which stay data inside their segment; `\\` is data too; empty
    /// segments are kept (a URL parser reads a leading `//public/x` as the authority `public`
    /// and the path `/x`); no dot-segment removal, so `/x/../v1` is under `/x/`.
    Literal,
    /// As a server that percent-decodes twice reads it (IIS's double-decoding bug,
    /// CVE-2001-0333, and many hand-written decoders): `%252e%252e` is `..`. On the second
    /// pass an invalid escape stays as it is (`/100%25` is a path with a `%` in it).
    DoubleDecoded,
}

impl PathReading {
    pub const ALL: [PathReading; 4] = [
        PathReading::Rfc3986,
        PathReading::PathParameters,
        PathReading::Literal,
        PathReading::DoubleDecoded,
    ];

    /// Whether reading a read path again this way gives it unchanged (so another intermediary
    /// normalising the same way cannot change a decision). Every reading but
    /// [`PathReading::DoubleDecoded`], which by its nature decodes further each time.
    pub fn is_idempotent(self) -> bool {
        self != PathReading::DoubleDecoded
    }
}

/// The path as an upstream would resolve it under RFC 3986 ([`PathReading::Rfc3986`]); see
/// [`read_path`].
pub fn normalize_path(raw: &str) -> Option<Cow<'_, str>> {
    read_path(raw, PathReading::Rfc3986)
}

/// Whether `raw` needs no work under any reading: it starts with `/` and has no escape,
/// backslash, NUL, path parameter, empty segment or segment starting with a dot. Then every
/// reading is `raw` itself, with no allocation (the common case on the hot path).
pub(crate) fn is_plain_path(raw: &str) -> bool {
    raw.starts_with('/')
        && !raw.bytes().any(|b| matches!(b, b'%' | b'\\' | b';' | 0))
        && !raw.contains("//")
        && !raw.contains("/.")
}

/// Whether `decide` holds for `raw` under every [`PathReading`]. A path that does not decode
/// (see [`read_path`]) never satisfies it. One call of `decide` with `raw` itself when the path
/// is plain.
pub fn every_reading(raw: &str, mut decide: impl FnMut(&str) -> bool) -> bool {
    if is_plain_path(raw) {
        return decide(raw);
    }
    PathReading::ALL
        .iter()
        .all(|&r| read_path(raw, r).is_some_and(|p| decide(&p)))
}

/// Whether `raw` is its own normal form: it reads the same under every [`PathReading`] and
/// has no percent-escape at all (`%2541` would read the same, but is not what an operator
/// means by a plain path): no escape, backslash, empty or dot segment, or path parameter
/// (`/.well-known/x` is normal).
pub fn is_normal_path(raw: &str) -> bool {
    is_plain_path(raw)
        || (!raw.contains('%')
            && PathReading::ALL
                .iter()
                .all(|&r| read_path(raw, r).is_some_and(|p| p == raw)))
}

/// The path as an upstream would read it under `reading`: percent-decoded once (twice for
/// [`PathReading::DoubleDecoded`]), then, except for [`PathReading::Literal`], `\\` read as `/`,
/// repeated slashes folded and dot-segments removed (RFC 3986 §5.2.4, with
/// [`PathReading::PathParameters`] first dropping each segment's `;` parameters). `None` if
/// it decodes to something no sane path holds (NUL, invalid UTF-8, a bad escape). Used only to
/// decide scope, quota cost and routes; the request is forwarded unchanged.
///
/// A literal `%` in the result (from `%25`) is written back as `%25`, so the result is a fixed
/// point for every [`PathReading::is_idempotent`] reading, and `%252e%252e` can never turn
/// into `..` by a second pass of the same reading (found by the `path` fuzz target).
pub fn read_path(raw: &str, reading: PathReading) -> Option<Cow<'_, str>> {
    if is_plain_path(raw) {
        return Some(Cow::Borrowed(raw));
    }
    let literal = reading == PathReading::Literal;
    let mut decoded = percent_decode(raw.as_bytes(), literal)?;
    if reading == PathReading::DoubleDecoded {
        decoded = percent_decode_lenient(&decoded);
    }
    if decoded.contains(&0) {
        return None;
    }
    // WHATWG URL parsers (Node's `URL`, browsers) and Python's `urlsplit` (3.9.5+, which
    // Starlette's `request.url` goes through) drop ASCII tab, LF and CR anywhere in a URL, so
    // `/..%09/admin` reads as `/../admin` to them (a fresh user's finding, past the base-path
    // check). Dropped in every reading, before dot-segments are looked for.
    decoded.retain(|b| !matches!(b, b'\t' | b'\n' | b'\r'));
    let mut text = String::from_utf8(decoded).ok()?;
    if !text.starts_with('/') {
        text.insert(0, '/');
    }
    if literal {
        return Some(Cow::Owned(text.replace('%', "%25")));
    }
    let text = text.replace('\\', "/");
    fn segment(seg: &str, reading: PathReading) -> &str {
        match reading {
            PathReading::PathParameters => seg.split(';').next().unwrap_or(""),
            _ => seg,
        }
    }
    let last = segment(text.rsplit('/').next().unwrap_or(""), reading);
    let ends_with_slash = last.is_empty() || last == "." || last == "..";
    let mut out: Vec<&str> = Vec::new();
    for seg in text.split('/').map(|seg| segment(seg, reading)) {
        match seg {
            "" | "." => {}
            ".." => {
                out.pop();
            }
            s => out.push(s),
        }
    }
    let mut result = String::with_capacity(text.len());
    for s in &out {
        result.push('/');
        for (j, part) in s.split('%').enumerate() {
            if j > 0 {
                result.push_str("%25");
            }
            result.push_str(part);
        }
    }
    if result.is_empty() || (ends_with_slash && !out.is_empty()) {
        result.push('/');
    }
    Some(Cow::Owned(result))
}

/// Percent-decodes `bytes` once (RFC 3986 §2.1). `None` on an escape that is not `%` and two
/// hex digits. With `keep_separators`, `%2F` and `%5C` are kept as written: data inside a
/// segment, as a literal reader sees them.
fn percent_decode(bytes: &[u8], keep_separators: bool) -> Option<Vec<u8>> {
    let mut decoded = Vec::with_capacity(bytes.len() + 1);
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'%' {
            let &[hi, lo] = bytes.get(i + 1..i + 3)? else {
                return None;
            };
            // Two hex digits exactly: `u8::from_str_radix` would also take `+f` as 0x0f.
            let c = (hex_val(hi)? << 4) | hex_val(lo)?;
            if keep_separators && matches!(c, b'/' | b'\\') {
                decoded.extend_from_slice(&bytes[i..i + 3]);
            } else {
                decoded.push(c);
            }
            i += 3;
        } else {
            decoded.push(b);
            i += 1;
        }
    }
    Some(decoded)
}

/// A second decoding pass as a careless decoder makes it: valid escapes decoded, anything
/// else kept as it is.
fn percent_decode_lenient(bytes: &[u8]) -> Vec<u8> {
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escape = (bytes[i] == b'%')
            .then(|| bytes.get(i + 1..i + 3))
            .flatten()
            .and_then(|h| Some((hex_val(h[0])? << 4) | hex_val(h[1])?));
        match escape {
            Some(c) => {
                decoded.push(c);
                i += 3;
            }
            None => {
                decoded.push(bytes[i]);
                i += 1;
            }
        }
    }
    decoded
}

fn hex_val(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(allow: &[&str], deny: &[&str], trusted: &[&str]) -> AccessRules {
        let l = |v: &[&str]| IpList::new(v.iter().map(|s| s.parse().unwrap()).collect());
        AccessRules::new(l(allow), l(deny), l(trusted))
    }

    #[test]
    fn allow_deny_and_mapped_addresses() {
        let r = rules(&["10.0.0.0/8", "2001:db8::/32"], &["10.9.0.0/16"], &[]);
        assert!(r.admits("10.1.2.3".parse().unwrap()));
        assert!(r.admits("::ffff:10.1.2.3".parse().unwrap()));
        assert!(!r.admits("10.9.2.3".parse().unwrap()));
        assert!(!r.admits("::ffff:10.9.2.3".parse().unwrap()));
        assert!(r.admits("2001:db8::1".parse().unwrap()));
        assert!(!r.admits("192.168.1.1".parse().unwrap()));
        assert!(rules(&[], &[], &[]).admits("192.168.1.1".parse().unwrap()));
    }

    #[test]
    fn client_ip_walks_trusted_hops_right_to_left() {
        let r = rules(&[], &[], &["10.0.0.0/8"]);
        let peer: IpAddr = "10.0.0.1".parse().unwrap();
        let xff = |v: &[&'static str]| v.iter().map(|s| s.as_bytes()).collect::<Vec<_>>();
        assert_eq!(
            r.client_ip(peer, xff(&["1.1.1.1, 2.2.2.2, 10.0.0.5"]).into_iter()),
            "2.2.2.2".parse::<IpAddr>().unwrap()
        );
        assert_eq!(
            r.client_ip(peer, xff(&["1.1.1.1", "10.0.0.7"]).into_iter()),
            "1.1.1.1".parse::<IpAddr>().unwrap()
        );
        assert_eq!(r.client_ip(peer, xff(&[]).into_iter()), peer);
        assert_eq!(
            r.client_ip(peer, xff(&["garbage, 10.0.0.9"]).into_iter()),
            "10.0.0.9".parse::<IpAddr>().unwrap()
        );
        assert_eq!(
            r.client_ip(peer, xff(&["[2001:db8::1]:443"]).into_iter()),
            "2001:db8::1".parse::<IpAddr>().unwrap()
        );
        // An untrusted peer's header is ignored.
        let outsider: IpAddr = "8.8.8.8".parse().unwrap();
        assert_eq!(
            r.client_ip(outsider, xff(&["1.1.1.1"]).into_iter()),
            outsider
        );
    }

    #[test]
    fn path_normalisation_blocks_escapes() {
        let s = Scope::new(None, Some(vec!["/v1/".into()]));
        assert!(s.permits(&Method::GET, "/v1/docs"));
        for escape in [
            "/v1/../admin",
            "/v1/%2e%2e/admin",
            "/v1/%2E%2E/admin",
            "/v1/..%2fadmin",
            "/v1%2f..%2fadmin",
            "/v1/..\\admin",
            "/admin",
            "/v1",
            "/v1/%00",
            "/v1/%zz",
        ] {
            assert!(!s.permits(&Method::GET, escape), "{escape}");
        }
        assert!(s.permits(&Method::GET, "/v1/./a/../b"));
        // Path parameters: servlet containers drop them before resolving dot-segments.
        for escape in [
            "/v1/..;/admin",
            "/v1/..;jsessionid=x/admin",
            "/v1/..%3b/admin",
            "/v1/%2e%2e;/admin",
            "/v1/.%2e;x/admin",
            "/v1/x/..;/..;/admin",
            "/v1;x/..;/..;/admin",
        ] {
            assert!(!s.permits(&Method::GET, escape), "{escape}");
        }
        // Literal readers route on the path as sent: `/x/../v1/` is under `/x/` for them, an
        // encoded slash is data, and a URL parser reads `//v1/admin` as host `v1`, path
        // `/admin`. Double decoders read `%252e%252e` as `..`.
        for escape in [
            "/admin/../v1/a",
            "/admin/%2e%2e/v1/a",
            "/admin/..;/v1/a",
            "//v1/admin",
            "//v1/",
            "/v1%2Fx/admin",
            "/v1%2fx/../admin",
            "/v1%5Cx/admin",
            "/v1/%252e%252e/admin",
            "/v1/%252E%252e%252fadmin",
        ] {
            assert!(!s.permits(&Method::GET, escape), "{escape}");
        }
        assert!(s.permits(&Method::GET, "/v1/a;x"));
        assert!(s.permits(&Method::GET, "/v1//a"));
        assert!(s.permits(&Method::GET, "/v1/a%2Fb"));
        assert!(s.permits(&Method::GET, "/v1/100%25"));
        assert!(s.permits(&Method::GET, "/v1/a;x/b/..;/c"));
        assert!(
            !s.permits(&Method::GET, "/v1;x/a"),
            "servlets read /v1/a, others /v1;x/a"
        );
        let s = Scope::new(Some(vec![Method::GET]), Some(vec!["/v1".into()]));
        assert!(s.permits(&Method::GET, "/v1"));
        assert!(s.permits(&Method::GET, "/v1/x"));
        assert!(!s.permits(&Method::GET, "/v1admin"));
        assert!(!s.permits(&Method::POST, "/v1/x"));
        assert_eq!(normalize_path("/a//b/./c/..").unwrap(), "/a/b/");
        assert_eq!(normalize_path("/../..").unwrap(), "/");
    }

    #[test]
    fn every_reading_of_a_path() {
        fn read(raw: &str, r: PathReading) -> String {
            read_path(raw, r).unwrap().into_owned()
        }
        use PathReading::*;
        for (raw, rfc, params, literal, double) in [
            ("/a/..;/b", "/a/..;/b", "/b", "/a/..;/b", "/a/..;/b"),
            (
                "/a/b;x=1/c",
                "/a/b;x=1/c",
                "/a/b/c",
                "/a/b;x=1/c",
                "/a/b;x=1/c",
            ),
            ("/a/%2e%2e/b", "/b", "/b", "/a/../b", "/b"),
            ("/a/..%09/b", "/b", "/b", "/a/../b", "/b"),
            ("/a/.%0A%0d./b", "/b", "/b", "/a/../b", "/b"),
            ("/a/./b/", "/a/b/", "/a/b/", "/a/./b/", "/a/b/"),
            ("/a/b/..;", "/a/b/..;", "/a/", "/a/b/..;", "/a/b/..;"),
            ("/a//b", "/a/b", "/a/b", "/a//b", "/a/b"),
            ("//a/b", "/a/b", "/a/b", "//a/b", "/a/b"),
            ("/a/;x/b", "/a/;x/b", "/a/b", "/a/;x/b", "/a/;x/b"),
            ("/a%2Fb/c", "/a/b/c", "/a/b/c", "/a%252Fb/c", "/a/b/c"),
            ("/a%5cb\\c", "/a/b/c", "/a/b/c", "/a%255cb\\c", "/a/b/c"),
            (
                "/a/%252e%252e/b",
                "/a/%252e%252e/b",
                "/a/%252e%252e/b",
                "/a/%252e%252e/b",
                "/b",
            ),
            ("/100%25", "/100%25", "/100%25", "/100%25", "/100%25"),
            (
                "/.well-known/x",
                "/.well-known/x",
                "/.well-known/x",
                "/.well-known/x",
                "/.well-known/x",
            ),
        ] {
            assert_eq!(read(raw, Rfc3986), rfc, "{raw}");
            assert_eq!(read(raw, PathParameters), params, "{raw}");
            assert_eq!(read(raw, Literal), literal, "{raw}");
            assert_eq!(read(raw, DoubleDecoded), double, "{raw}");
            for r in PathReading::ALL.into_iter().filter(|r| r.is_idempotent()) {
                let once = read(raw, r);
                assert_eq!(read(&once, r), once, "{raw} {r:?} is not a fixed point");
            }
        }
        assert!(is_normal_path("/hooks/docs"));
        assert!(is_normal_path("/.well-known/x"));
        for raw in [
            "/hooks/a;b",
            "/hooks/..;/x",
            "/hooks/%41",
            "/hooks//x",
            "/hooks/./x",
            "hooks",
        ] {
            assert!(!is_normal_path(raw), "{raw}");
        }
    }

    /// Regressions from the `path` fuzz target: the result must be a fixed point, and only two
    /// hex digits make an escape.
    #[test]
    fn normalised_paths_are_fixed_points() {
        for raw in [
            "/%252f",
            "/v1/%252e%252e/admin",
            "/a%25b/",
            "/100%25",
            "/%2525",
        ] {
            let once = normalize_path(raw).unwrap().into_owned();
            assert_eq!(normalize_path(&once).unwrap(), once, "{raw}");
        }
        assert_eq!(normalize_path("/%252f").unwrap(), "/%252f");
        assert_eq!(
            normalize_path("/v1/%252e%252e/x").unwrap(),
            "/v1/%252e%252e/x"
        );
        let s = Scope::new(None, Some(vec!["/v1/".into()]));
        // A double decoder reads it as `/x`.
        assert!(!s.permits(&Method::GET, "/v1/%252e%252e/x"));
        assert!(s.permits(&Method::GET, "/v1/%252e%252e/v1/x"));
        assert!(!s.permits(&Method::GET, "/v1/%252e%252e/../../admin"));
        for bad in [
            "/v1/%+f", "/v1/%-1", "/v1/% f", "/v1/%f", "/v1/%", "/\0", "/v1/a\0b",
        ] {
            assert!(normalize_path(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn method_overrides_in_the_query_must_lie_in_the_scope() {
        let get_post = Scope::new(Some(vec![Method::GET, Method::POST]), None);
        for q in [
            "_method=DELETE",
            "a=1&_method=delete",
            "_METHOD=PUT",
            "%5Fmethod=DELETE",
            "%255Fmethod=DELETE",
            "_method=%44ELETE",
            "_method=+DELETE",
            "x=1;_method=PATCH",
            "_method=",
            "_method",
            // PHP's reading of names (fresh user T8-8).
            "_method%00=DELETE",
            "_method%00x=DELETE",
            "_method%00%00=DELETE",
            ".method=DELETE",
            "%2Emethod=DELETE",
            "%20.method=DELETE",
            " _method=DELETE",
            "_method[]=DELETE",
            "_method[a]=DELETE",
            "_%6Dethod=DELETE",
            "%5F%6D%65%74%68%6F%64=DELETE",
            "%255F%256Dethod=DELETE",
        ] {
            assert!(!get_post.permits_overrides(Some(q)), "{q}");
        }
        for q in [
            "_method=GET",
            "_method=post",
            "method=DELETE",
            "x_method=DELETE",
            "a=1&b=2",
            "",
            "_method_=DELETE",
            "_methods=DELETE",
            "q=%41%42",
        ] {
            assert!(get_post.permits_overrides(Some(q)), "{q}");
        }
        assert!(get_post.permits_overrides(None));
        let any = Scope::new(None, None);
        assert!(any.permits_overrides(Some("_method=DELETE")));
    }
}
