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
    name == header::CONNECTION
        || name == KEEP_ALIVE
        || name == PROXY_CONNECTION
        || name == header::TE
        || name == header::TRAILER
        || name == header::TRANSFER_ENCODING
        || name == header::UPGRADE
        || name == header::PROXY_AUTHENTICATE
        || name == header::PROXY_AUTHORIZATION
        || name == HTTP2_SETTINGS
}

/// Removes hop-by-hop fields and every field the `Connection` field names (RFC 9110 §7.6.1).
/// With `upgrade`, that value is sent as `Upgrade` with `Connection: upgrade` (RFC 9110 §7.8:
/// a sender of `Upgrade` must also send the `upgrade` connection option).
pub fn strip_hop_by_hop(headers: &mut HeaderMap, upgrade: Option<HeaderValue>) {
    if headers.contains_key(header::CONNECTION) {
        let named: Vec<HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
            .collect();
        for n in named {
            headers.remove(&n);
        }
    }
    for n in [
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
    ] {
        headers.remove(n);
    }
    if let Some(u) = upgrade {
        headers.insert(header::UPGRADE, u);
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
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

#[cfg(test)]
mod tests {
    use super::*;
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
}
