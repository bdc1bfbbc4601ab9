//! The protocol rules of an HTTP intermediary, kept in one place (RFC 9110, 9112, 9113).
//!
//! `pipeline.rs` decides *whether* a request goes to the upstream; this module decides what a
//! request and a response look like on the other side: which fields are hop-by-hop, which
//! protocol upgrades may pass, which client fields could pose as the ones keygate sets. Each
//! rule names its RFC section; the table-driven tests at the end hold one row per case, so the
//! next rule is one line and one row.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");
/// RFC 7540 §3.2.1: a connection-specific field of the (obsolete) h2c upgrade.
static HTTP2_SETTINGS: HeaderName = HeaderName::from_static("http2-settings");

/// Hop-by-hop fields: RFC 9110 §7.6.1 (`Connection`, `Proxy-Connection`, `Keep-Alive`, `TE`,
/// `Transfer-Encoding`, `Upgrade`), RFC 9110 §11.7 (`Proxy-Authenticate`,
/// `Proxy-Authorization`: meant for a proxy, keygate is the last one), `Trailer` and
/// `HTTP2-Settings` (RFC 7540 §3.2.1). None of them is ever forwarded as received.
pub fn is_hop_by_hop(name: &HeaderName) -> bool {
    HOP_BY_HOP.contains(&name)
}

/// The fields [`is_hop_by_hop`] names; `Connection` first.
static HOP_BY_HOP: [&HeaderName; 10] = [
    &header::CONNECTION,
    &KEEP_ALIVE,
    &PROXY_CONNECTION,
    &header::TE,
    &header::TRAILER,
    &header::TRANSFER_ENCODING,
    &header::UPGRADE,
    &header::PROXY_AUTHENTICATE,
    &header::PROXY_AUTHORIZATION,
    &HTTP2_SETTINGS,
];

/// Removes hop-by-hop fields and every field the `Connection` field names (RFC 9110 §7.6.1).
/// With `upgrade`, that value is sent as `Upgrade` with `Connection: upgrade` (RFC 9110 §7.8:
/// a sender of `Upgrade` must also send the `upgrade` connection option).
///
/// Runs on every request and response, so it looks before it removes: one pass over the field
/// names, and only the fields present are removed (a response with `Connection: keep-alive`
/// costs one removal and no allocation).
pub fn strip_hop_by_hop(headers: &mut HeaderMap, upgrade: Option<HeaderValue>) {
    let mut present = 0u16;
    for name in headers.keys() {
        if let Some(i) = HOP_BY_HOP.iter().position(|h| *h == name) {
            present |= 1 << i;
        }
    }
    if present & 1 != 0 {
        remove_connection_options(headers);
    }
    for (i, name) in HOP_BY_HOP.iter().enumerate() {
        if present & (1 << i) != 0 {
            headers.remove(*name);
        }
    }
    if let Some(u) = upgrade {
        headers.insert(header::UPGRADE, u);
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
}

/// Removes the fields the `Connection` options name (`Connection: close, X-Private` removes
/// `X-Private`). Allocates only when one of them is present.
fn remove_connection_options(headers: &mut HeaderMap) {
    let options = || {
        headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
    };
    if !options().any(|t| headers.contains_key(t)) {
        return;
    }
    let named: Vec<HeaderName> = options()
        .filter_map(|t| HeaderName::from_bytes(t.as_bytes()).ok())
        .collect();
    for n in named {
        headers.remove(&n);
    }
}

/// The `[upstream]` settings that shape what the upstream receives, validated
/// (`config/build/forwarding.rs`).
#[derive(Debug, Clone)]
pub struct ForwardRules {
    /// Lower-case protocol names that may pass through `Upgrade` (default `["websocket"]`);
    /// never one that [`carries_http`].
    pub upgrade_protocols: Vec<Box<str>>,
    /// Which authority the upstream receives as `Host`.
    pub host: HostMode,
}

impl Default for ForwardRules {
    fn default() -> Self {
        ForwardRules {
            upgrade_protocols: DEFAULT_UPGRADE_PROTOCOLS
                .iter()
                .map(|p| Box::from(*p))
                .collect(),
            host: HostMode::Client,
        }
    }
}

/// `[upstream] host`: which authority the upstream is told the request was for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostMode {
    /// The authority the client used (HTTP/1.1 `Host`, HTTP/2 `:authority`), as Caddy and
    /// Traefik do: applications build absolute URLs on keygate's public origin.
    Client,
    /// The upstream URL's own authority (for virtual-hosted upstreams); `Location`,
    /// `Content-Location` and `Refresh` pointing at the upstream are rewritten to the public
    /// origin (nginx `proxy_redirect default`).
    Upstream,
}

// ---------------------------------------------------------------------------------------------
// Protocol upgrades (RFC 9110 §7.8, §15.2.2)
// ---------------------------------------------------------------------------------------------

/// Default `[upstream] upgrade_protocols`.
pub const DEFAULT_UPGRADE_PROTOCOLS: &[&str] = &["websocket"];

/// Longest protocol name keygate logs (a name is a token; longer ones are cut).
pub const MAX_LOGGED_PROTOCOL: usize = 32;

/// Protocols that would carry HTTP (or TLS around HTTP) inside the tunnel: after the switch,
/// every request on the connection would go to the upstream unseen, past the credential,
/// scope and rate-limit checks. `h2c` (RFC 7540 §3.2, removed by RFC 9113 §3.1), `h2`, `HTTP/x`
/// (RFC 9110 §7.8's own example) and `TLS/x` (RFC 2817). Never forwarded, whatever the
/// configuration says, and refused by `keygate check` in `upgrade_protocols`.
pub fn carries_http(name: &str) -> bool {
    ["h2c", "h2", "http", "tls"]
        .iter()
        .any(|p| p.eq_ignore_ascii_case(name))
}

/// `tchar` of RFC 9110 §5.6.2.
fn is_tchar(c: u8) -> bool {
    c.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&c)
}

/// Whether `s` is a `token` (RFC 9110 §5.6.2).
pub fn is_token(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(is_tchar)
}

/// Splits one `Upgrade` list member, `protocol-name ["/" protocol-version]` (RFC 9110 §7.8),
/// into its name. `None` if it is not of that form.
fn protocol_name(member: &str) -> Option<&str> {
    let (name, version) = match member.split_once('/') {
        Some((n, v)) => (n, Some(v)),
        None => (member, None),
    };
    (is_token(name) && version.is_none_or(is_token)).then_some(name)
}

/// A protocol name as it may appear in a log line or an event: token characters only, at most
/// [`MAX_LOGGED_PROTOCOL`] bytes; anything else is `"<invalid>"`.
pub fn loggable_protocol(name: &str) -> String {
    if is_token(name) {
        name[..name.len().min(MAX_LOGGED_PROTOCOL)].to_ascii_lowercase()
    } else {
        "<invalid>".to_string()
    }
}

/// Why a client's `Upgrade` did not pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpgradeRefusal {
    /// Not in `[upstream] upgrade_protocols`.
    NotAllowed,
    /// A protocol that would carry HTTP through the tunnel ([`carries_http`]).
    CarriesHttp,
    /// Not an HTTP/1.1 request: HTTP/1.0 `Upgrade` must be ignored (RFC 9110 §7.8), HTTP/2
    /// has no `Upgrade` (RFC 9113 §8.2.2).
    NotHttp11,
    /// `Upgrade` without the `upgrade` option in `Connection` (RFC 9110 §7.8).
    NoConnectionOption,
    /// Not a `protocol-name["/"protocol-version]` list member.
    Invalid,
}

impl UpgradeRefusal {
    pub fn as_str(self) -> &'static str {
        match self {
            UpgradeRefusal::NotAllowed => "not_allowed",
            UpgradeRefusal::CarriesHttp => "carries_http",
            UpgradeRefusal::NotHttp11 => "not_http11",
            UpgradeRefusal::NoConnectionOption => "no_connection_option",
            UpgradeRefusal::Invalid => "invalid",
        }
    }
}

/// What becomes of a client's `Upgrade` field.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct UpgradeOffer {
    /// The `Upgrade` value to forward: the client's allowed protocols, in its order of
    /// preference. `None`: the request is forwarded as an ordinary request.
    pub forward: Option<HeaderValue>,
    /// The first protocol that did not pass ([`loggable_protocol`]) and why, for the
    /// `upgrade_refused` event.
    pub refused: Option<(String, UpgradeRefusal)>,
}

/// Applies the upgrade policy to a request (RFC 9110 §7.8): only HTTP/1.1 requests that name
/// `upgrade` in `Connection` can upgrade, and of the protocols they offer only those in
/// `allowed` (lower-case names) that do not carry HTTP pass. No allocation without `Upgrade`.
pub fn upgrade_offer(
    version: http::Version,
    headers: &HeaderMap,
    allowed: &[Box<str>],
) -> UpgradeOffer {
    let mut offer = UpgradeOffer::default();
    if !headers.contains_key(header::UPGRADE) {
        return offer;
    }
    let members = headers
        .get_all(header::UPGRADE)
        .iter()
        .flat_map(|v| v.to_str().unwrap_or("\u{0}").split(','))
        .map(str::trim)
        .filter(|m| !m.is_empty());
    let whole_request_refusal = if version != http::Version::HTTP_11 {
        Some(UpgradeRefusal::NotHttp11)
    } else if !connection_has(headers, "upgrade") {
        Some(UpgradeRefusal::NoConnectionOption)
    } else {
        None
    };
    let mut forward = String::new();
    for member in members {
        let verdict = match (protocol_name(member), whole_request_refusal) {
            (None, _) => Err(("<invalid>".to_string(), UpgradeRefusal::Invalid)),
            (Some(name), Some(r)) => Err((loggable_protocol(name), r)),
            (Some(name), None) if carries_http(name) => {
                Err((loggable_protocol(name), UpgradeRefusal::CarriesHttp))
            }
            (Some(name), None) if !allowed.iter().any(|a| a.eq_ignore_ascii_case(name)) => {
                Err((loggable_protocol(name), UpgradeRefusal::NotAllowed))
            }
            (Some(_), None) => Ok(member),
        };
        match verdict {
            Ok(member) => {
                if !forward.is_empty() {
                    forward.push_str(", ");
                }
                forward.push_str(member);
            }
            Err(refused) => {
                offer.refused.get_or_insert(refused);
            }
        }
    }
    if !forward.is_empty() {
        offer.forward = HeaderValue::from_str(&forward).ok();
    }
    offer
}

/// Whether a `Connection` field lists `option` (case-insensitive, RFC 9110 §7.6.1).
pub fn connection_has(headers: &HeaderMap, option: &str) -> bool {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(option))
}

/// Why an upstream's `101 Switching Protocols` cannot be honoured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SwitchError {
    #[error("upstream switched protocols on a request keygate did not forward as an upgrade")]
    NotRequested,
    #[error("upstream's 101 response has no single valid Upgrade protocol")]
    NoProtocol,
    #[error("upstream's 101 response names a protocol the request did not offer")]
    NotOffered,
}

/// Checks an upstream's 101 against the `Upgrade` keygate forwarded (RFC 9110 §15.2.2: the
/// server switches to one of the protocols the client listed and says which in `Upgrade`).
/// Anything else is never spliced: the tunnel would carry a protocol nobody allowed.
pub fn check_switch(
    response: &HeaderMap,
    forwarded: Option<&HeaderValue>,
) -> Result<(), SwitchError> {
    let forwarded = forwarded
        .and_then(|v| v.to_str().ok())
        .ok_or(SwitchError::NotRequested)?;
    let mut values = response.get_all(header::UPGRADE).iter();
    let (Some(value), None) = (values.next(), values.next()) else {
        return Err(SwitchError::NoProtocol);
    };
    let chosen = value
        .to_str()
        .ok()
        .map(str::trim)
        .and_then(protocol_name)
        .ok_or(SwitchError::NoProtocol)?;
    if carries_http(chosen) {
        return Err(SwitchError::NotOffered);
    }
    forwarded
        .split(',')
        .filter_map(|m| protocol_name(m.trim()))
        .any(|offered| offered.eq_ignore_ascii_case(chosen))
        .then_some(())
        .ok_or(SwitchError::NotOffered)
}

// ---------------------------------------------------------------------------------------------
// Fields keygate manages, and their look-alikes (SPEC §4)
// ---------------------------------------------------------------------------------------------

/// What keygate does with a field it manages, when a client sends it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Managed {
    /// keygate sets its own value; a client's is always removed.
    Set,
    /// A credential keygate consumes; never forwarded.
    Credential,
    /// Describes the client or the proxy hop: kept (exact spelling) from a trusted proxy, removed
    /// from anyone else. keygate extends or sets `X-Forwarded-For` / `X-Forwarded-Host` itself.
    ProxyContext,
    /// Would change the method or target the key's scope was checked against (method-override
    /// and URL-rewrite fields that frameworks honour); always removed.
    ScopeOverride,
}

/// The fields keygate manages, beyond `[auth] header` and `[auth] identity_header` (added by
/// the caller). One row per name; the next one is one line here and one row in the test.
pub static MANAGED_FIELDS: [(HeaderName, Managed); 37] = {
    use Managed::*;
    [
        // RFC 7239 and the de-facto X-Forwarded-* family: keygate's view of the client.
        (HeaderName::from_static("forwarded"), ProxyContext),
        (HeaderName::from_static("x-forwarded-for"), ProxyContext),
        (HeaderName::from_static("x-forwarded-host"), ProxyContext),
        (HeaderName::from_static("x-forwarded-proto"), Set),
        (HeaderName::from_static("x-forwarded-port"), ProxyContext),
        (HeaderName::from_static("x-forwarded-prefix"), ProxyContext),
        (HeaderName::from_static("x-forwarded-server"), ProxyContext),
        (HeaderName::from_static("x-forwarded-ssl"), ProxyContext),
        (HeaderName::from_static("x-forwarded-scheme"), ProxyContext),
        (HeaderName::from_static("x-url-scheme"), ProxyContext),
        (HeaderName::from_static("front-end-https"), ProxyContext),
        (HeaderName::from_static("x-real-ip"), Set),
        (HeaderName::from_static("x-client-ip"), ProxyContext),
        (HeaderName::from_static("true-client-ip"), ProxyContext),
        (HeaderName::from_static("x-cluster-client-ip"), ProxyContext),
        (
            HeaderName::from_static("x-original-forwarded-for"),
            ProxyContext,
        ),
        // The client-address names "real IP" helpers read besides those (PHP's most copied
        // snippet checks HTTP_CLIENT_IP first; Node's request-ip, django-ipware, CDNs and
        // clouds): a fresh user planted an address through each (T5-14). keygate is the edge,
        // so no client may name its own address to the upstream under any of them.
        (HeaderName::from_static("client-ip"), ProxyContext),
        (HeaderName::from_static("x-forwarded"), ProxyContext),
        (HeaderName::from_static("forwarded-for"), ProxyContext),
        (HeaderName::from_static("cf-connecting-ip"), ProxyContext),
        (HeaderName::from_static("cf-pseudo-ipv4"), ProxyContext),
        (HeaderName::from_static("fastly-client-ip"), ProxyContext),
        (HeaderName::from_static("fly-client-ip"), ProxyContext),
        (HeaderName::from_static("x-appengine-user-ip"), ProxyContext),
        (HeaderName::from_static("x-azure-clientip"), ProxyContext),
        (HeaderName::from_static("x-proxyuser-ip"), ProxyContext),
        (
            HeaderName::from_static("x-envoy-external-address"),
            ProxyContext,
        ),
        (HeaderName::from_static("x-originating-ip"), ProxyContext),
        (HeaderName::from_static("x-request-id"), Set),
        // Set by keygate on webhook routes (SPEC §10); never the client's to claim.
        (HeaderName::from_static("x-keygate-webhook"), Set),
        (header::AUTHORIZATION, Credential),
        // Method override (Rails, Express, Symfony, Google APIs) and URL rewrite (IIS, old
        // Symfony/Zend) fields: a key scoped to GET /public/ must not become DELETE /admin.
        (
            HeaderName::from_static("x-http-method-override"),
            ScopeOverride,
        ),
        (HeaderName::from_static("x-http-method"), ScopeOverride),
        (HeaderName::from_static("x-method-override"), ScopeOverride),
        (HeaderName::from_static("x-original-method"), ScopeOverride),
        (HeaderName::from_static("x-original-url"), ScopeOverride),
        (HeaderName::from_static("x-rewrite-url"), ScopeOverride),
    ]
};

/// The name as a CGI-style server sees it (RFC 3875 §4.1.18: `HTTP_` + name, upper case, `-`
/// as `_`; Apache's mod_cgi and PHP turn every other non-alphanumeric byte into `_` too): two
/// names are the same variable when they agree byte by byte after folding case and reading
/// every non-alphanumeric byte as one separator.
pub fn same_cgi_variable(a: &str, b: &str) -> bool {
    let fold = |c: u8| {
        if c.is_ascii_alphanumeric() {
            c.to_ascii_lowercase()
        } else {
            b'-'
        }
    };
    a.len() == b.len() && a.bytes().zip(b.bytes()).all(|(x, y)| fold(x) == fold(y))
}

/// keygate's own namespace: every `X-Keygate-*` field (the default identity header even when
/// `identity_header` names another, `X-Keygate-Webhook`, whatever comes next) is keygate's to
/// set, never a client's.
pub const KEYGATE_PREFIX: &str = "x-keygate-";

/// How a managed field sent by a client is treated, if `name` is (a look-alike of) one:
/// `extra` are `[auth] header` and `identity_header`, always removed. A look-alike spelling
/// (`X_Forwarded_For`, `x.real.ip`) is always removed, even from a trusted proxy.
fn managed_verdict(
    name: &HeaderName,
    extra: &[&HeaderName],
    from_trusted_proxy: bool,
) -> Option<bool> {
    let n = name.as_str();
    if extra.iter().any(|m| same_cgi_variable(m.as_str(), n))
        || n.get(..KEYGATE_PREFIX.len())
            .is_some_and(|p| same_cgi_variable(p, KEYGATE_PREFIX))
    {
        return Some(true);
    }
    let (m, kind) = MANAGED_FIELDS
        .iter()
        .find(|(m, _)| same_cgi_variable(m.as_str(), n))?;
    let exact = m == name;
    Some(!(exact && from_trusted_proxy && *kind == Managed::ProxyContext))
}

/// Removes from a client's request every field keygate manages, in every spelling a
/// CGI/WSGI/ASGI server reads as the same name (any case, `_` or any other separator for `-`,
/// any number of copies) — except the exact `ProxyContext` names when the peer is a trusted
/// proxy. Allocates only when something is removed.
pub fn remove_managed_fields(h: &mut HeaderMap, extra: &[&HeaderName], from_trusted_proxy: bool) {
    // The exact names first (the credential is in every request): then the scan below finds
    // nothing and allocates nothing in the common case.
    for name in extra {
        h.remove(*name);
    }
    let found: Vec<HeaderName> = h
        .keys()
        .filter(|n| managed_verdict(n, extra, from_trusted_proxy) == Some(true))
        .cloned()
        .collect();
    for n in found {
        h.remove(n);
    }
}

// ---------------------------------------------------------------------------------------------
// Which authority a request names (RFC 9110 §7.2, RFC 9112 §3.2, RFC 9113 §8.3.1)
// ---------------------------------------------------------------------------------------------

/// Why a request is refused before anything else looks at it (400, nothing forwarded).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Malformed {
    /// RFC 9112 §3.2: an HTTP/1.1 request without `Host`.
    #[error("HTTP/1.1 request without Host")]
    MissingHost,
    /// RFC 9112 §3.2: more than one `Host` field line (any version).
    #[error("more than one Host field")]
    DuplicateHost,
    /// RFC 9112 §3.2 / RFC 9110 §7.2: `Host` is not `uri-host [":" port]`.
    #[error("invalid Host value")]
    InvalidHost,
    /// RFC 9113 §8.3.1: an HTTP/2 `host` field that names another authority than `:authority`.
    #[error("HTTP/2 host field disagrees with :authority")]
    HostMismatch,
    /// RFC 9113 §8.3.1: an HTTP/2 request with neither `:authority` nor `host`.
    #[error("HTTP/2 request without :authority or host")]
    MissingAuthority,
    /// The request target's authority (HTTP/1.1 absolute-form, HTTP/2 `:authority`) is not
    /// `uri-host [":" port]`: userinfo (`user:pass@host`, RFC 9110 §4.2.4: to be treated as an
    /// error; RFC 9113 §8.3.1: malformed) or a port that is not 1 to 5 digits. It would be
    /// forwarded as `Host` and `X-Forwarded-Host`, userinfo (a credential, often) and all.
    #[error("invalid authority in the request target")]
    InvalidAuthority,
}

impl Malformed {
    pub fn as_str(self) -> &'static str {
        match self {
            Malformed::MissingHost => "missing_host",
            Malformed::DuplicateHost => "duplicate_host",
            Malformed::InvalidHost => "invalid_host",
            Malformed::HostMismatch => "host_mismatch",
            Malformed::MissingAuthority => "missing_authority",
            Malformed::InvalidAuthority => "invalid_authority",
        }
    }
}

/// A `Host` value: `uri-host [":" port]`, no userinfo, no path (RFC 9110 §7.2).
fn valid_host(v: &HeaderValue) -> bool {
    v.to_str().is_ok_and(valid_host_str)
}

/// [`valid_host`] on a string (also a request target's authority).
///
/// The last valid value is remembered per thread: a client names the same host on every
/// request, and parsing it as an [`http::uri::Authority`] copies it into a new buffer (one
/// allocation per request; issue 10). The answer depends only on the text, so a remembered one
/// is the answer.
fn valid_host_str(s: &str) -> bool {
    thread_local! {
        static LAST_VALID: std::cell::RefCell<String> = const { std::cell::RefCell::new(String::new()) };
    }
    if !s.is_empty() && LAST_VALID.with_borrow(|last| last == s) {
        return true;
    }
    let valid = parse_host_str(s);
    // Bounded: a host name is at most 255 bytes (RFC 1035 §2.3.4) and a port 6 more.
    if valid && s.len() <= 262 {
        LAST_VALID.with_borrow_mut(|last| {
            last.clear();
            last.push_str(s);
        });
    }
    valid
}

fn parse_host_str(s: &str) -> bool {
    let port = match s.strip_prefix('[') {
        Some(rest) => match rest.split_once(']') {
            Some((_, "")) => None,
            Some((_, after)) => match after.strip_prefix(':') {
                Some(p) => Some(p),
                None => return false,
            },
            None => return false,
        },
        None => s.split_once(':').map(|(_, p)| p),
    };
    !s.is_empty()
        && !s.contains('@')
        && port.is_none_or(|p| p.len() <= 5 && p.bytes().all(|c| c.is_ascii_digit()))
        && s.parse::<http::uri::Authority>().is_ok()
}

/// Same authority, comparing the host case-insensitively (RFC 9110 §4.2.3).
fn same_authority(a: &[u8], b: &[u8]) -> bool {
    a.eq_ignore_ascii_case(b)
}

/// The intermediary checks on which authority a request names, made before authentication:
/// RFC 9112 §3.2 (HTTP/1.1: exactly one valid `Host`, also with an absolute-form target) and
/// RFC 9113 §8.3.1 (HTTP/2: `host`, if sent, agrees with `:authority`).
pub fn check_authority<B>(req: &http::Request<B>) -> Result<(), Malformed> {
    let mut hosts = req.headers().get_all(header::HOST).iter();
    let (host, second) = (hosts.next(), hosts.next());
    if second.is_some() {
        return Err(Malformed::DuplicateHost);
    }
    if host.is_some_and(|h| !valid_host(h)) {
        return Err(Malformed::InvalidHost);
    }
    if req
        .uri()
        .authority()
        .is_some_and(|a| !valid_host_str(a.as_str()))
    {
        return Err(Malformed::InvalidAuthority);
    }
    match req.version() {
        http::Version::HTTP_2 | http::Version::HTTP_3 => match (req.uri().authority(), host) {
            (Some(a), Some(h)) if !same_authority(a.as_str().as_bytes(), h.as_bytes()) => {
                Err(Malformed::HostMismatch)
            }
            (None, None) => Err(Malformed::MissingAuthority),
            _ => Ok(()),
        },
        http::Version::HTTP_11 if host.is_none() => Err(Malformed::MissingHost),
        _ => Ok(()),
    }
}

/// The authority the client named: the target's (HTTP/2 `:authority`; an HTTP/1.1
/// absolute-form target, whose authority replaces `Host` per RFC 9112 §3.2.2), else `Host`.
pub fn client_authority<B>(req: &http::Request<B>) -> Option<HeaderValue> {
    match req.uri().authority() {
        Some(a) => HeaderValue::from_str(a.as_str()).ok(),
        None => req.headers().get(header::HOST).cloned(),
    }
}

// ---------------------------------------------------------------------------------------------
// Field lines (RFC 9110 §5.3, RFC 9113 §8.2.3)
// ---------------------------------------------------------------------------------------------

/// Joins several `Cookie` field lines into one with `"; "`: HTTP/2 clients send each cookie
/// as its own field ("crumbs", RFC 9113 §8.2.3), which must be concatenated before going to an
/// HTTP/1.1 upstream; there, two `Cookie` lines would be joined with `,` by most servers
/// (RFC 6265 §5.4 allows only one), and `session=abc123,lang=en` is one wrong cookie.
pub fn join_cookie_crumbs(h: &mut HeaderMap) {
    let mut values = h.get_all(header::COOKIE).iter();
    if values.next().is_none() || values.next().is_none() {
        return;
    }
    let mut joined = Vec::new();
    for v in h.get_all(header::COOKIE) {
        let v = v.as_bytes().trim_ascii();
        if v.is_empty() {
            continue;
        }
        if !joined.is_empty() {
            joined.extend_from_slice(b"; ");
        }
        joined.extend_from_slice(v);
    }
    if let Ok(v) = HeaderValue::from_bytes(&joined) {
        h.insert(header::COOKIE, v);
    }
}

/// RFC 9110 §7.6.2: an intermediary forwarding `OPTIONS` or `TRACE` decrements
/// `Max-Forwards`. `false` when it is already 0: the request must not be forwarded.
pub fn decrement_max_forwards(method: &http::Method, h: &mut HeaderMap) -> bool {
    if method != http::Method::OPTIONS && method != http::Method::TRACE {
        return true;
    }
    let Some(n) = h
        .get(header::MAX_FORWARDS)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
    else {
        return true;
    };
    if n == 0 {
        return false;
    }
    h.insert(header::MAX_FORWARDS, HeaderValue::from(n - 1));
    true
}

/// RFC 9110 §7.6.3: "An HTTP-to-HTTP gateway MUST send an appropriate Via header field in
/// each inbound request message". keygate appends `<received-protocol> keygate` (a pseudonym,
/// not its host name) to any `Via` the client sent, in one field line. Responses get none (a
/// MAY). Note for nginx upstreams: with `gzip_proxied off` (its default) nginx does not compress
/// responses to requests carrying `Via`.
pub fn append_via(version: http::Version, h: &mut HeaderMap) {
    let (proto, alone) = match version {
        http::Version::HTTP_09 => ("0.9", "0.9 keygate"),
        http::Version::HTTP_10 => ("1.0", "1.0 keygate"),
        http::Version::HTTP_2 => ("2", "2 keygate"),
        http::Version::HTTP_3 => ("3", "3 keygate"),
        _ => ("1.1", "1.1 keygate"),
    };
    if !h.contains_key(header::VIA) {
        // The common case: nothing to append to, and no allocation.
        h.insert(header::VIA, HeaderValue::from_static(alone));
        return;
    }
    let mut via = Vec::with_capacity(32);
    for v in h.get_all(header::VIA) {
        via.extend_from_slice(v.as_bytes().trim_ascii());
        via.extend_from_slice(b", ");
    }
    via.extend_from_slice(proto.as_bytes());
    via.extend_from_slice(b" keygate");
    if let Ok(v) = HeaderValue::from_bytes(&via) {
        h.insert(header::VIA, v);
    }
}

// ---------------------------------------------------------------------------------------------
// Redirects out of the upstream (nginx `proxy_redirect default`)
// ---------------------------------------------------------------------------------------------

/// Response fields that carry a URL a client follows: `Location` (RFC 9110 §10.2.2),
/// `Content-Location` (§8.7) and `Refresh` (`5; url=…`, HTML's de-facto header).
pub static URL_FIELDS: [HeaderName; 3] = [
    header::LOCATION,
    header::CONTENT_LOCATION,
    HeaderName::from_static("refresh"),
];

/// With `[upstream] host = "upstream"`: rewrites URL fields that point at the upstream
/// (`scheme://authority/base_path…`) to `https://<public authority>/…`, as nginx's
/// `proxy_redirect default` does. Relative URLs and other origins are left alone.
pub fn rewrite_upstream_urls(
    h: &mut HeaderMap,
    upstream: (&http::uri::Scheme, &http::uri::Authority, &str),
    public: &HeaderValue,
) {
    let (scheme, authority, base) = upstream;
    let Ok(public) = public.to_str() else { return };
    for name in &URL_FIELDS {
        let Some(v) = h.get(name).and_then(|v| v.to_str().ok()) else {
            continue;
        };
        // Refresh: `<seconds>; url=<URL>` — only the URL part is rewritten.
        let (prefix, url) = if *name == URL_FIELDS[2] {
            match v.to_ascii_lowercase().find("url=") {
                Some(i) => (&v[..i + 4], &v[i + 4..]),
                None => continue,
            }
        } else {
            ("", v)
        };
        let Some(rest) = strip_origin(url, scheme.as_str(), authority.as_str()) else {
            continue;
        };
        let rest = match rest.strip_prefix(base) {
            Some(r) if base.is_empty() || r.is_empty() || r.starts_with(['/', '?', '#']) => r,
            _ => continue,
        };
        let slash = if rest.starts_with('/') { "" } else { "/" };
        if let Ok(new) = HeaderValue::from_str(&format!("{prefix}https://{public}{slash}{rest}")) {
            h.insert(name.clone(), new);
        }
    }
}

/// `url` without its `scheme://authority` if the authority is the upstream's (host compared
/// without regard to case, a default port written or not). `http` and `https` both count: an
/// application told `X-Forwarded-Proto: https` builds `https://<its own authority>/…`.
fn strip_origin<'u>(url: &'u str, scheme: &str, authority: &str) -> Option<&'u str> {
    let (s, rest) = url.split_once("://")?;
    let default_port = |scheme: &str| {
        if scheme.eq_ignore_ascii_case("https") {
            ":443"
        } else {
            ":80"
        }
    };
    if !s.eq_ignore_ascii_case("http") && !s.eq_ignore_ascii_case("https") {
        return None;
    }
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (auth, path) = rest.split_at(end);
    let a = auth.strip_suffix(default_port(s)).unwrap_or(auth);
    let b = authority
        .strip_suffix(default_port(scheme))
        .unwrap_or(authority);
    a.eq_ignore_ascii_case(b).then_some(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The remembered last valid host never changes an answer: each value, checked after any
    /// other (valid or not), gets what a fresh parse gives.
    #[test]
    fn remembered_host_gives_the_parsed_answer() {
        let values = [
            "example.com",
            "example.com:8443",
            "example.com@evil",
            "[::1]:8443",
            "[::1",
            "",
            "a b",
            "example.com:99999",
            "EXAMPLE.com",
            "u:p@example.com",
        ];
        for first in values {
            for second in values {
                valid_host_str(first);
                assert_eq!(
                    valid_host_str(second),
                    parse_host_str(second),
                    "{second:?} after {first:?}"
                );
                assert_eq!(valid_host_str(second), valid_host_str(second));
            }
        }
        assert!(valid_host_str("example.com") && !valid_host_str("example.com@evil"));
    }
    use http::Version;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (n, v) in pairs {
            h.append(
                HeaderName::from_bytes(n.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn upgrade_policy_table() {
        let allowed: Vec<Box<str>> = vec!["websocket".into(), "foo".into()];
        let up = |c: &str| ("connection", c.to_string());
        // (version, Upgrade, Connection, forwarded Upgrade, refused (name, reason))
        type Row<'a> = (
            Version,
            &'a str,
            &'a str,
            Option<&'a str>,
            Option<(&'a str, UpgradeRefusal)>,
        );
        use UpgradeRefusal::*;
        let rows: &[Row] = &[
            (
                Version::HTTP_11,
                "websocket",
                "Upgrade",
                Some("websocket"),
                None,
            ),
            (
                Version::HTTP_11,
                "WebSocket",
                "keep-alive, UPGRADE",
                Some("WebSocket"),
                None,
            ),
            (
                Version::HTTP_11,
                "h2c",
                "Upgrade, HTTP2-Settings",
                None,
                Some(("h2c", CarriesHttp)),
            ),
            (
                Version::HTTP_11,
                "H2C",
                "upgrade",
                None,
                Some(("h2c", CarriesHttp)),
            ),
            (
                Version::HTTP_11,
                "HTTP/2.0",
                "upgrade",
                None,
                Some(("http", CarriesHttp)),
            ),
            (
                Version::HTTP_11,
                "TLS/1.2",
                "upgrade",
                None,
                Some(("tls", CarriesHttp)),
            ),
            (
                Version::HTTP_11,
                "h2",
                "upgrade",
                None,
                Some(("h2", CarriesHttp)),
            ),
            (
                Version::HTTP_11,
                "h2c, websocket",
                "upgrade",
                Some("websocket"),
                Some(("h2c", CarriesHttp)),
            ),
            (
                Version::HTTP_11,
                "websocket, foo/2",
                "upgrade",
                Some("websocket, foo/2"),
                None,
            ),
            (
                Version::HTTP_11,
                "irc/6.9",
                "upgrade",
                None,
                Some(("irc", NotAllowed)),
            ),
            (
                Version::HTTP_11,
                "web socket",
                "upgrade",
                None,
                Some(("<invalid>", Invalid)),
            ),
            (
                Version::HTTP_11,
                "websocket",
                "keep-alive",
                None,
                Some(("websocket", NoConnectionOption)),
            ),
            (
                Version::HTTP_11,
                "websocket",
                "",
                None,
                Some(("websocket", NoConnectionOption)),
            ),
            (
                Version::HTTP_10,
                "websocket",
                "upgrade",
                None,
                Some(("websocket", NotHttp11)),
            ),
            (
                Version::HTTP_2,
                "websocket",
                "upgrade",
                None,
                Some(("websocket", NotHttp11)),
            ),
            (
                Version::HTTP_11,
                &"a".repeat(100),
                "upgrade",
                None,
                Some((&"a".repeat(32), NotAllowed)),
            ),
        ];
        for (version, upgrade, connection, fwd, refused) in rows {
            let mut pairs = vec![("upgrade", upgrade.to_string())];
            if !connection.is_empty() {
                pairs.push(up(connection));
            }
            let pairs: Vec<(&str, &str)> = pairs.iter().map(|(n, v)| (*n, v.as_str())).collect();
            let offer = upgrade_offer(*version, &headers(&pairs), &allowed);
            assert_eq!(
                offer.forward.as_ref().map(|v| v.to_str().unwrap()),
                *fwd,
                "{version:?} {upgrade} / {connection}"
            );
            assert_eq!(
                offer.refused.as_ref().map(|(n, r)| (n.as_str(), *r)),
                *refused,
                "{version:?} {upgrade} / {connection}"
            );
        }
        // h2c stays refused even if an allowlist (built without `check`) names it.
        let h2c: Vec<Box<str>> = vec!["h2c".into()];
        let offer = upgrade_offer(
            Version::HTTP_11,
            &headers(&[("upgrade", "h2c"), ("connection", "upgrade")]),
            &h2c,
        );
        assert_eq!(offer.forward, None);
        assert!(
            upgrade_offer(Version::HTTP_11, &HeaderMap::new(), &allowed) == UpgradeOffer::default()
        );
    }

    #[test]
    fn switch_table() {
        use SwitchError::*;
        // (forwarded Upgrade, response Upgrade fields, outcome)
        type Row<'a> = (Option<&'a str>, &'a [&'a str], Result<(), SwitchError>);
        let rows: &[Row] = &[
            (Some("websocket"), &["websocket"], Ok(())),
            (Some("websocket"), &["WebSocket"], Ok(())),
            (Some("websocket, foo/2"), &["foo/2"], Ok(())),
            (None, &["websocket"], Err(NotRequested)),
            (None, &["h2c"], Err(NotRequested)),
            (Some("websocket"), &["h2c"], Err(NotOffered)),
            (Some("websocket"), &["irc"], Err(NotOffered)),
            (Some("websocket"), &[], Err(NoProtocol)),
            (
                Some("websocket"),
                &["websocket", "websocket"],
                Err(NoProtocol),
            ),
            (Some("websocket"), &["websocket, h2c"], Err(NoProtocol)),
        ];
        for (fwd, resp, want) in rows {
            let pairs: Vec<(&str, &str)> = resp.iter().map(|v| ("upgrade", *v)).collect();
            let fwd = fwd.map(HeaderValue::from_static);
            assert_eq!(
                check_switch(&headers(&pairs), fwd.as_ref()),
                *want,
                "{fwd:?} {resp:?}"
            );
        }
    }

    #[test]
    fn hop_by_hop_table() {
        let mut h = headers(&[
            ("connection", "close, X-Private, HTTP2-Settings"),
            ("x-private", "1"),
            ("keep-alive", "timeout=5"),
            ("proxy-connection", "keep-alive"),
            ("te", "trailers"),
            ("trailer", "x-sum"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "h2c"),
            ("http2-settings", "AAMAAABkAARAAAAAAAIAAAAA"),
            ("proxy-authorization", "Basic Zm9vOmJhcg=="),
            ("proxy-authenticate", "Basic"),
            ("x-kept", "1"),
        ]);
        strip_hop_by_hop(&mut h, None);
        assert_eq!(h.keys().map(|k| k.as_str()).collect::<Vec<_>>(), ["x-kept"]);
        let mut h = headers(&[("upgrade", "h2c"), ("connection", "upgrade")]);
        strip_hop_by_hop(&mut h, Some(HeaderValue::from_static("websocket")));
        assert_eq!(h["upgrade"], "websocket");
        assert_eq!(h["connection"], "upgrade");
    }

    #[test]
    fn managed_fields_table() {
        let cred = HeaderName::from_static("x-api-key");
        let ident = HeaderName::from_static("x-keygate-key-id");
        // (client field name, sent by a trusted proxy, removed)
        let rows: &[(&str, bool, bool)] = &[
            ("x-forwarded-for", false, true),
            ("x-forwarded-for", true, false),
            ("x_forwarded_for", true, true),
            ("X_Forwarded_For", false, true),
            ("x.forwarded.for", false, true),
            ("x-forwarded_for", false, true),
            ("forwarded", true, false),
            ("forwarded", false, true),
            ("x-forwarded-host", true, false),
            ("x_forwarded_host", true, true),
            ("x-forwarded-proto", true, true),
            ("x_forwarded_proto", false, true),
            ("x-real-ip", true, true),
            ("x_real_ip", false, true),
            ("x-request-id", false, true),
            ("x_request_id", false, true),
            ("x-keygate-key-id", true, true),
            ("x_keygate_key_id", false, true),
            ("X-KEYGATE-KEY-ID", false, true),
            ("x-api-key", false, true),
            ("x_api_key", false, true),
            ("authorization", true, true),
            ("authorization", false, true),
            ("x-keygate-webhook", false, true),
            ("x_keygate_webhook", false, true),
            ("x-http-method-override", true, true),
            ("x_original_url", false, true),
            ("true-client-ip", false, true),
            ("true-client-ip", true, false),
            ("x-keygate-anything", true, true),
            ("X_KEYGATE_FUTURE", false, true),
            ("x-forwarded", false, true),
            ("x_forwarded", false, true),
            ("x-forwarded", true, false),
            ("client-ip", false, true),
            ("Client_IP", false, true),
            ("cf-connecting-ip", false, true),
            ("CF_CONNECTING_IP", false, true),
            ("fastly-client-ip", false, true),
            ("forwarded-for", false, true),
            ("x-envoy-external-address", false, true),
            ("x-azure-clientip", false, true),
            // Not managed: names that merely contain a managed one, or differ in length.
            ("x-keygate", false, false),
            ("x-forwarded-forx", false, false),
            ("client-ips", false, false),
            ("x-api-keys", false, false),
            ("x_custom_header", false, false),
            ("content-type", false, false),
            ("cookie", false, false),
        ];
        for (name, trusted, removed) in rows {
            let mut h = HeaderMap::new();
            let n = HeaderName::from_bytes(name.as_bytes()).unwrap();
            h.append(n.clone(), HeaderValue::from_static("203.0.113.66"));
            h.append(n.clone(), HeaderValue::from_static("second copy"));
            h.insert("x-kept", HeaderValue::from_static("1"));
            remove_managed_fields(&mut h, &[&cred, &ident], *trusted);
            assert_eq!(!h.contains_key(&n), *removed, "{name} trusted={trusted}");
            assert!(h.contains_key("x-kept"));
        }
    }

    #[test]
    fn authority_table() {
        use Malformed::*;
        // (version, target, Host fields, outcome, client authority)
        type Row<'a> = (
            Version,
            &'a str,
            &'a [&'a str],
            Result<(), Malformed>,
            Option<&'a str>,
        );
        let rows: &[Row] = &[
            (
                Version::HTTP_11,
                "/p",
                &["example.com"],
                Ok(()),
                Some("example.com"),
            ),
            (
                Version::HTTP_11,
                "/p",
                &["example.com:8443"],
                Ok(()),
                Some("example.com:8443"),
            ),
            (
                Version::HTTP_11,
                "/p",
                &["[::1]:8443"],
                Ok(()),
                Some("[::1]:8443"),
            ),
            (Version::HTTP_11, "/p", &[], Err(MissingHost), None),
            (
                Version::HTTP_11,
                "/p",
                &["a", "b"],
                Err(DuplicateHost),
                Some("a"),
            ),
            (
                Version::HTTP_11,
                "/p",
                &["a", "a"],
                Err(DuplicateHost),
                Some("a"),
            ),
            (
                Version::HTTP_11,
                "/p",
                &["user@evil"],
                Err(InvalidHost),
                Some("user@evil"),
            ),
            (
                Version::HTTP_11,
                "/p",
                &["a/b"],
                Err(InvalidHost),
                Some("a/b"),
            ),
            (Version::HTTP_11, "/p", &[""], Err(InvalidHost), Some("")),
            (
                Version::HTTP_11,
                "/p",
                &["a:port"],
                Err(InvalidHost),
                Some("a:port"),
            ),
            // RFC 9112 §3.2.2: absolute-form — the target's authority wins over Host.
            (
                Version::HTTP_11,
                "https://target.example/p",
                &["other"],
                Ok(()),
                Some("target.example"),
            ),
            (
                Version::HTTP_11,
                "https://target.example/p",
                &[],
                Err(MissingHost),
                Some("target.example"),
            ),
            (Version::HTTP_10, "/p", &[], Ok(()), None),
            (
                Version::HTTP_10,
                "/p",
                &["a", "b"],
                Err(DuplicateHost),
                Some("a"),
            ),
            (
                Version::HTTP_2,
                "https://a.example/p",
                &[],
                Ok(()),
                Some("a.example"),
            ),
            (
                Version::HTTP_2,
                "https://a.example/p",
                &["A.EXAMPLE"],
                Ok(()),
                Some("a.example"),
            ),
            (
                Version::HTTP_2,
                "https://a.example/p",
                &["b.example"],
                Err(HostMismatch),
                Some("a.example"),
            ),
            (
                Version::HTTP_2,
                "https://a.example:1/p",
                &["a.example:2"],
                Err(HostMismatch),
                Some("a.example:1"),
            ),
            (
                Version::HTTP_2,
                "/p",
                &["a.example"],
                Ok(()),
                Some("a.example"),
            ),
            (Version::HTTP_2, "/p", &[], Err(MissingAuthority), None),
            // RFC 9110 §4.2.4, RFC 9113 §8.3.1: no userinfo in a target's authority, whatever
            // Host says; the port is digits.
            (
                Version::HTTP_11,
                "https://user:pw@target.example/p",
                &["target.example"],
                Err(InvalidAuthority),
                Some("user:pw@target.example"),
            ),
            (
                Version::HTTP_11,
                "http://@target.example/p",
                &["target.example"],
                Err(InvalidAuthority),
                Some("@target.example"),
            ),
            (
                Version::HTTP_2,
                "https://user@a.example/p",
                &[],
                Err(InvalidAuthority),
                Some("user@a.example"),
            ),
            (
                Version::HTTP_2,
                "https://u:p@a.example:8443/p",
                &["u:p@a.example:8443"],
                Err(InvalidHost),
                Some("u:p@a.example:8443"),
            ),
            (
                Version::HTTP_2,
                "https://[::1]:8443/p",
                &[],
                Ok(()),
                Some("[::1]:8443"),
            ),
        ];
        for (version, target, hosts, want, authority) in rows {
            let mut b = http::Request::builder().version(*version).uri(*target);
            for h in *hosts {
                b = b.header(header::HOST, *h);
            }
            let req = b.body(()).unwrap();
            assert_eq!(
                check_authority(&req),
                *want,
                "{version:?} {target} {hosts:?}"
            );
            assert_eq!(
                client_authority(&req).as_ref().map(|v| v.to_str().unwrap()),
                *authority,
                "{version:?} {target} {hosts:?}"
            );
        }
    }

    #[test]
    fn cookie_and_max_forwards_table() {
        let rows: &[(&[&str], Option<&str>)] = &[
            (&[], None),
            (&["a=1"], Some("a=1")),
            (
                &["session=abc123", "lang=en"],
                Some("session=abc123; lang=en"),
            ),
            (&["a=1; b=2", " c=3 ", ""], Some("a=1; b=2; c=3")),
        ];
        for (crumbs, want) in rows {
            let pairs: Vec<(&str, &str)> = crumbs.iter().map(|c| ("cookie", *c)).collect();
            let mut h = headers(&pairs);
            join_cookie_crumbs(&mut h);
            let got: Vec<_> = h
                .get_all("cookie")
                .iter()
                .map(|v| v.to_str().unwrap())
                .collect();
            assert_eq!(got, want.map(|w| vec![w]).unwrap_or_default(), "{crumbs:?}");
        }
        use http::Method;
        // (method, Max-Forwards, forwarded?, forwarded value)
        let rows: &[(Method, Option<&str>, bool, Option<&str>)] = &[
            (Method::OPTIONS, Some("3"), true, Some("2")),
            (Method::OPTIONS, Some("0"), false, Some("0")),
            (Method::TRACE, Some("1"), true, Some("0")),
            (Method::GET, Some("0"), true, Some("0")),
            (Method::OPTIONS, None, true, None),
            (Method::OPTIONS, Some("x"), true, Some("x")),
        ];
        for (m, mf, fwd, after) in rows {
            let mut h = headers(&mf.map(|v| vec![("max-forwards", v)]).unwrap_or_default());
            assert_eq!(decrement_max_forwards(m, &mut h), *fwd, "{m} {mf:?}");
            assert_eq!(h.get("max-forwards").map(|v| v.to_str().unwrap()), *after);
        }
    }

    #[test]
    fn upstream_url_rewrite_table() {
        let scheme = http::uri::Scheme::HTTP;
        let authority: http::uri::Authority = "127.0.0.1:8000".parse().unwrap();
        let public = HeaderValue::from_static("api.example.com");
        // (base path, field, upstream value, client sees)
        let rows: &[(&str, &str, &str, &str)] = &[
            (
                "",
                "location",
                "http://127.0.0.1:8000/items/",
                "https://api.example.com/items/",
            ),
            (
                "",
                "location",
                "HTTP://127.0.0.1:8000",
                "https://api.example.com/",
            ),
            (
                "",
                "location",
                "http://127.0.0.1:8000?x=1",
                "https://api.example.com/?x=1",
            ),
            (
                "",
                "location",
                "http://127.0.0.1:8001/items/",
                "http://127.0.0.1:8001/items/",
            ),
            (
                "",
                "location",
                "https://127.0.0.1:8000/items/",
                "https://api.example.com/items/",
            ),
            ("", "location", "/items/", "/items/"),
            (
                "",
                "location",
                "https://elsewhere.example/",
                "https://elsewhere.example/",
            ),
            (
                "",
                "content-location",
                "http://127.0.0.1:8000/doc/1",
                "https://api.example.com/doc/1",
            ),
            (
                "",
                "refresh",
                "5; url=http://127.0.0.1:8000/next",
                "5; url=https://api.example.com/next",
            ),
            ("", "refresh", "5", "5"),
            (
                "/api",
                "location",
                "http://127.0.0.1:8000/api/items",
                "https://api.example.com/items",
            ),
            (
                "/api",
                "location",
                "http://127.0.0.1:8000/api",
                "https://api.example.com/",
            ),
            (
                "/api",
                "location",
                "http://127.0.0.1:8000/apix",
                "http://127.0.0.1:8000/apix",
            ),
            (
                "/api",
                "location",
                "http://127.0.0.1:8000/other",
                "http://127.0.0.1:8000/other",
            ),
        ];
        for (base, field, value, want) in rows {
            let mut h = headers(&[(field, value)]);
            rewrite_upstream_urls(&mut h, (&scheme, &authority, base), &public);
            assert_eq!(h[*field], *want, "{base} {field}: {value}");
        }
        let default_port: http::uri::Authority = "backend".parse().unwrap();
        let mut h = headers(&[("location", "http://backend:80/x")]);
        rewrite_upstream_urls(&mut h, (&scheme, &default_port, ""), &public);
        assert_eq!(h["location"], "https://api.example.com/x");
    }

    /// RFC 9110 §7.6.3: keygate's entry alone, or appended to the client's in one field line.
    #[test]
    fn via_names_keygate_after_any_earlier_recipients() {
        use http::Version;
        let rows: &[(Version, &[&str], &str)] = &[
            (Version::HTTP_11, &[], "1.1 keygate"),
            (Version::HTTP_2, &[], "2 keygate"),
            (Version::HTTP_10, &[], "1.0 keygate"),
            (Version::HTTP_11, &["1.1 edge"], "1.1 edge, 1.1 keygate"),
            (
                Version::HTTP_2,
                &["1.1 a", " 2 b "],
                "1.1 a, 2 b, 2 keygate",
            ),
        ];
        for (version, sent, want) in rows {
            let mut h = HeaderMap::new();
            for v in *sent {
                h.append(header::VIA, HeaderValue::from_str(v).unwrap());
            }
            append_via(*version, &mut h);
            let got: Vec<_> = h.get_all(header::VIA).iter().collect();
            assert_eq!(got, [*want], "{version:?} {sent:?}");
        }
    }
}
