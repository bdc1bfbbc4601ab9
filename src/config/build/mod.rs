//! Raw TOML → validated [`Snapshot`]. Collects every problem, each with its TOML path.
//! Sections with rules of their own have their own file: `roles.rs`, `keys.rs`, `lifecycle.rs`.

mod keys;
mod lifecycle;
mod roles;

mod caps;
mod cluster;
mod cors;
mod webhooks;
pub use webhooks::webhook_route;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderName, HeaderValue};
use ipnet::IpNet;

use super::raw::{Hsts, RawConfig};
use super::{
    AuthSettings, ConfigError, ConfigErrors, LogSettings, ServerSettings, Snapshot, StateSettings,
};
use crate::access::{AccessRules, IpList};
use crate::forward::Upstream;
use crate::limits::{FailedAuthThrottle, Rate};
use crate::tls;

mod durations;
mod forwarding;
mod key_ids;

/// Query parameters always redacted in logged paths (SPEC §6).
pub const BUILTIN_REDACTED_PARAMS: &[&str] = &[
    "api_key",
    "apikey",
    "key",
    "token",
    "access_token",
    "signature",
    "sig",
    "secret",
    "password",
];

/// Where the TLS certificate comes from: files named in the config, or memory (`keygate demo`).
#[derive(Clone)]
pub enum TlsSource {
    Pem { cert: Vec<u8>, key: Vec<u8> },
}

/// Most `[server] workers`: event loops beyond the CPUs add threads and descriptors, not
/// throughput.
pub const MAX_WORKERS: usize = 1024;
/// Most `[server] max_header_bytes` (1 MiB; nginx's `large_client_header_buffers` are a few
/// times 8 KiB).
pub const MAX_HEADER_BYTES: usize = 1024 * 1024;
/// Most `[server] h2_max_concurrent_streams` (nginx's default is 128, Envoy's and hyper's 100-200).
pub const MAX_H2_STREAMS: u32 = 1000;
/// Most `[auth] verify_concurrency`: 64 argon2 verifications at OWASP's 19 MiB are 1.2 GiB.
pub const MAX_VERIFY_CONCURRENCY: usize = 64;
/// Most `[auth] failed_auth_max_clients` (about 100 MB of tracked addresses).
pub const MAX_FAILED_AUTH_CLIENTS: usize = 1_000_000;

/// What a build needs besides the file itself.
#[derive(Default)]
pub struct BuildContext<'a> {
    /// Relative paths in the file are relative to this directory (the config file's).
    pub base_dir: PathBuf,
    /// Replaces `[tls] cert`/`key` (the in-memory demo certificate).
    pub tls_override: Option<TlsSource>,
    /// The snapshot being replaced: per-key rate-limit state, verified-key cache entries and the
    /// per-IP failed-auth state are carried over from it for keys that stay the same.
    pub previous: Option<&'a Snapshot>,
    /// The runtime's per-key in-flight counters (`max_concurrent`), which outlive snapshots:
    /// a key takes its counter from here, so no sequence of reloads resets a count that
    /// requests still hold. `None` (`check`, start-up): carried from `previous`, else new.
    pub in_flight: Option<&'a crate::upstream_cap::KeyInFlightTable>,
    /// The runtime's webhook delivery-id stores, which outlive snapshots (a route removed and
    /// put back keeps its ids). `None`: carried from `previous` only.
    pub delivery_stores: Option<&'a crate::webhook::replay::DeliveryStores>,
}

/// A CA bundle with no certificate valid now is an error at `path`; one with some expired (or
/// not yet valid) beside valid ones is a warning (`tls::check_ca_validity`).
fn check_ca_validity(pem: &[u8], path: &str, errs: &mut Errors, warnings: &mut Vec<String>) {
    match tls::check_ca_validity(pem, jiff::Timestamp::now().as_second()) {
        Ok(None) => {}
        Ok(Some(w)) => warnings.push(format!("{path}: {w}")),
        Err(m) => errs.push(path, m),
    }
}

/// Reads and deserializes a config file. Structural errors (unknown fields, wrong types) are
/// reported with their TOML path; they stop the parse, so they come one at a time.
pub fn load_file(path: &Path) -> Result<RawConfig, ConfigErrors> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        ConfigErrors::one(
            "",
            format!("cannot read config file {}: {e}", path.display()),
        )
    })?;
    parse_str(&text)
}

pub fn parse_str(text: &str) -> Result<RawConfig, ConfigErrors> {
    let line_of = |span: Option<std::ops::Range<usize>>| {
        span.map(|s| text[..s.start.min(text.len())].matches('\n').count() + 1)
    };
    let de = toml::de::Deserializer::parse(text).map_err(|e| {
        // The message only, never the snippet of the file (it may hold a hash).
        let line = line_of(e.span())
            .map(|l| format!(" (line {l})"))
            .unwrap_or_default();
        ConfigErrors::one(
            "",
            format!("TOML syntax error: {}{line}", e.message().trim()),
        )
    })?;
    let mut raw: RawConfig = serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let line = line_of(inner.span())
            .map(|l| format!(" (line {l})"))
            .unwrap_or_default();
        let path = if path == "." { String::new() } else { path };
        let path = key_ids::label(&path, |i| key_ids::id_in_text(text, i)).unwrap_or(path);
        ConfigErrors::one(
            path,
            format!("{}{line}", without_string_values(inner.message().trim())),
        )
    })?;
    raw.fingerprint = fingerprint(text);
    Ok(raw)
}

/// Settings that differ between the instances of one cluster by design (each binds its own
/// host's addresses and sizes its own event loops), left out of [`fingerprint`] so that a
/// cluster behind an L4 balancer with per-host addresses does not alert on drift forever.
const PER_INSTANCE_SETTINGS: [(&str, &str); 4] = [
    ("server", "listen"),
    ("server", "workers"),
    ("admin", "listen"),
    ("cluster", "instance"),
];

/// SHA-256 (first 16 hex digits) of the file's canonical form: parsed, with the
/// [`PER_INSTANCE_SETTINGS`] removed, re-serialised with sorted keys. Comments, layout and key
/// order do not change it; any other setting does. It names the config in `/metrics`
/// (`keygate_config_info{hash=…}`) so that instances of one cluster can be compared; it is a
/// digest of a file that holds no secret values (secrets are references), so it reveals none.
fn fingerprint(text: &str) -> String {
    use sha2::Digest as _;
    let Ok(mut v) = text.parse::<toml::Table>() else {
        return String::new();
    };
    for (section, key) in PER_INSTANCE_SETTINGS {
        if let Some(toml::Value::Table(t)) = v.get_mut(section) {
            t.remove(key);
        }
    }
    let canonical = toml::to_string(&v).unwrap_or_default();
    let d = sha2::Sha256::digest(canonical.as_bytes());
    d.iter().take(8).map(|b| format!("{b:02x}")).collect()
}

/// serde quotes an offending string value (`invalid type: string "…", expected u64`). A value
/// in the wrong place may be a secret pasted into the wrong field, so it is not repeated:
/// `invalid type: a string, expected u64`.
fn without_string_values(msg: &str) -> String {
    let mut out = String::with_capacity(msg.len());
    let mut rest = msg;
    while let Some(i) = rest.find("string \"") {
        out.push_str(&rest[..i]);
        out.push_str("a string");
        // Skip the Debug-quoted value, escapes included.
        let value = &rest[i + "string \"".len()..];
        let mut escaped = false;
        let mut end = value.len();
        for (j, c) in value.char_indices() {
            match c {
                _ if escaped => escaped = false,
                '\\' => escaped = true,
                '"' => {
                    end = j + 1;
                    break;
                }
                _ => {}
            }
        }
        rest = &value[end..];
    }
    out.push_str(rest);
    out
}

struct Errors(Vec<ConfigError>);

impl Errors {
    fn push(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.0.push(ConfigError::new(path, message));
    }
}

/// `"500ms"`, `"10s"`, `"5m"`, `"1h"`, `"90d"`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s.trim()).map_err(|_| {
        format!("invalid duration {s:?} (use e.g. \"500ms\", \"10s\", \"5m\", \"1h\")")
    })
}

/// `"N/s"`, `"N/min"`, `"N/h"` (also `"N/m"` for minutes).
pub fn parse_rate(s: &str) -> Result<Rate, String> {
    let bad = || format!("invalid rate {s:?} (use \"N/s\", \"N/min\" or \"N/h\" with N ≥ 1)");
    let (n, unit) = s.trim().split_once('/').ok_or_else(bad)?;
    let count: u32 = n.trim().parse().map_err(|_| bad())?;
    if count == 0 {
        return Err(bad());
    }
    let period = match unit.trim() {
        "s" | "sec" | "second" => Duration::from_secs(1),
        "m" | "min" | "minute" => Duration::from_secs(60),
        "h" | "hour" => Duration::from_secs(3600),
        _ => return Err(bad()),
    };
    Ok(Rate { count, period })
}

fn parse_instant(s: &str) -> Result<jiff::Timestamp, String> {
    if let Ok(ts) = s.parse::<jiff::Timestamp>() {
        return Ok(ts);
    }
    // A bare date means the start of that day, UTC.
    if s.len() == 10
        && let Ok(d) = s.parse::<jiff::civil::Date>()
        && let Ok(z) = d.to_zoned(jiff::tz::TimeZone::UTC)
    {
        return Ok(z.timestamp());
    }
    Err(format!(
        "invalid instant {s:?} (use an RFC 3339 time with offset, e.g. 2027-01-31T00:00:00Z, or a date)"
    ))
}

/// A CIDR (or a bare address: /32, /128), truncated to its network. IPv4-mapped IPv6 networks
/// (`::ffff:10.0.0.0/104`, `::ffff:192.0.2.7`) are read as the IPv4 network they map: client
/// addresses are matched in canonical form (a mapped address as IPv4), so a mapped network
/// would match nothing, and a `deny` rule written that way would silently not apply (a fresh
/// user's finding). Mapped networks shorter than /96 are left as written.
fn parse_cidr(s: &str) -> Result<IpNet, String> {
    let s = s.trim();
    let net = if let Ok(net) = s.parse::<IpNet>() {
        net.trunc()
    } else if let Ok(ip) = s.parse::<std::net::IpAddr>() {
        IpNet::from(ip)
    } else {
        return Err(format!("invalid CIDR {s:?}"));
    };
    if let IpNet::V6(v6) = net
        && v6.prefix_len() >= 96
        && let Some(v4) = v6.network().to_ipv4_mapped()
    {
        let v4 = ipnet::Ipv4Net::new(v4, v6.prefix_len() - 96).expect("prefix within 0..=32");
        return Ok(IpNet::V4(v4));
    }
    Ok(net)
}

fn cidr_list(list: &[String], path: &str, errs: &mut Errors) -> IpList {
    let mut nets = Vec::with_capacity(list.len());
    for (i, s) in list.iter().enumerate() {
        match parse_cidr(s) {
            Ok(n) => nets.push(n),
            Err(m) => errs.push(format!("{path}[{i}]"), m),
        }
    }
    IpList::new(nets)
}

fn resolve(base: &Path, p: &str) -> PathBuf {
    let p = Path::new(p);
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        base.join(p)
    }
}

/// Reads a file the config names (relative paths: from the config's directory); a failure is
/// recorded under the field's TOML path.
fn read_file(base: &Path, file: &str, path: &str, errs: &mut Errors) -> Option<Vec<u8>> {
    let p = resolve(base, file);
    match std::fs::read(&p) {
        Ok(b) => Some(b),
        Err(e) => {
            errs.push(path, format!("cannot read {}: {e}", p.display()));
            None
        }
    }
}

/// The duration at `path`, or `default`; zero and values outside the path's range
/// ([`durations::bounds`]) are errors.
fn duration_or(v: &Option<String>, default: &str, path: &str, errs: &mut Errors) -> Duration {
    let s = v.as_deref().unwrap_or(default);
    match parse_duration(s) {
        Ok(d) if d.is_zero() => {
            errs.push(path, "must be greater than zero");
            Duration::from_secs(1)
        }
        Ok(d) => durations::check(path, s, d).unwrap_or_else(|m| {
            errs.push(path, m);
            Duration::from_secs(1)
        }),
        Err(m) => {
            errs.push(path, m);
            Duration::from_secs(1)
        }
    }
}

fn header_name(
    v: &Option<String>,
    default: &'static str,
    path: &str,
    errs: &mut Errors,
) -> HeaderName {
    let s = v.as_deref().unwrap_or(default);
    match HeaderName::from_bytes(s.as_bytes()) {
        Ok(h) => h,
        Err(_) => {
            errs.push(path, format!("invalid header name {s:?}"));
            HeaderName::from_static(default_lower(default))
        }
    }
}

fn default_lower(s: &'static str) -> &'static str {
    match s {
        "X-API-Key" => "x-api-key",
        _ => "x-keygate-key-id",
    }
}

/// Builds and validates a snapshot. On error, nothing is returned: the caller keeps what it had.
pub fn build(raw: RawConfig, ctx: &BuildContext<'_>) -> Result<Snapshot, ConfigErrors> {
    let mut errs = Errors(Vec::new());
    let mut warnings = Vec::new();
    let base = &ctx.base_dir;

    // [server]
    let s = &raw.server;
    let listen_text = s.listen.as_deref().unwrap_or("0.0.0.0:8443");
    let listen = listen_text.parse::<SocketAddr>().unwrap_or_else(|_| {
        errs.push(
            "server.listen",
            format!("invalid socket address {listen_text:?}"),
        );
        SocketAddr::from(([0, 0, 0, 0], 8443))
    });
    // Counts and sizes whose cost is memory or descriptors per unit have upper bounds as well
    // as lower ones (fresh user T5-8: `workers = 5000` passed check, then the process ran out
    // of descriptors after announcing it was listening).
    match s.workers {
        Some(0) => errs.push("server.workers", "must be at least 1"),
        Some(n) if n > MAX_WORKERS => errs.push(
            "server.workers",
            format!("must be at most {MAX_WORKERS} (one event loop per CPU is the useful most)"),
        ),
        _ => {}
    }
    let max_header_bytes = s.max_header_bytes.unwrap_or(16 * 1024);
    if max_header_bytes < 1024 {
        errs.push("server.max_header_bytes", "must be at least 1024");
    } else if max_header_bytes > MAX_HEADER_BYTES {
        errs.push(
            "server.max_header_bytes",
            format!("must be at most {MAX_HEADER_BYTES} (1 MiB): every connection may hold that much before 431"),
        );
    }
    let max_connections = s.max_connections.unwrap_or(4096);
    if max_connections == 0 {
        errs.push("server.max_connections", "must be at least 1");
    }
    let h2_streams = s.h2_max_concurrent_streams.unwrap_or(100);
    if h2_streams == 0 {
        errs.push("server.h2_max_concurrent_streams", "must be at least 1");
    } else if h2_streams > MAX_H2_STREAMS {
        errs.push(
            "server.h2_max_concurrent_streams",
            format!(
                "must be at most {MAX_H2_STREAMS}: each stream in flight holds a request's state"
            ),
        );
    }
    let hsts = match &s.hsts {
        None | Some(Hsts::Enabled(true)) => Some(HeaderValue::from_static("max-age=31536000")),
        Some(Hsts::Enabled(false)) => None,
        Some(Hsts::Value(v)) => match HeaderValue::from_str(v) {
            Ok(h) if v.starts_with("max-age=") => Some(h),
            _ => {
                errs.push(
                    "server.hsts",
                    "must be false or a value starting with \"max-age=\"",
                );
                None
            }
        },
    };
    let caps = caps::build(&raw, max_connections, &mut errs);
    let server = ServerSettings {
        listen,
        workers: s.workers,
        max_body_bytes: s
            .max_body_bytes
            .unwrap_or(crate::config::DEFAULT_MAX_BODY_BYTES),
        max_header_bytes,
        header_read_timeout: duration_or(
            &s.header_read_timeout,
            "10s",
            "server.header_read_timeout",
            &mut errs,
        ),
        body_read_timeout: duration_or(
            &s.body_read_timeout,
            "60s",
            "server.body_read_timeout",
            &mut errs,
        ),
        tls_handshake_timeout: duration_or(
            &s.tls_handshake_timeout,
            "10s",
            "server.tls_handshake_timeout",
            &mut errs,
        ),
        idle_timeout: duration_or(&s.idle_timeout, "60s", "server.idle_timeout", &mut errs),
        max_connections,
        shutdown_grace: duration_or(&s.shutdown_grace, "30s", "server.shutdown_grace", &mut errs),
        h2_max_concurrent_streams: h2_streams,
        hsts,
        proxy_protocol: s.proxy_protocol.unwrap_or(false),
    };

    // [tls]
    let raw_tls = raw.tls.unwrap_or_default();
    let min_version = match raw_tls.min_version.as_deref().unwrap_or("1.2") {
        "1.2" => tls::MinVersion::Tls12,
        "1.3" => tls::MinVersion::Tls13,
        other => {
            errs.push(
                "tls.min_version",
                format!("must be \"1.2\" or \"1.3\", not {other:?}"),
            );
            tls::MinVersion::Tls12
        }
    };
    let pem = match &ctx.tls_override {
        Some(TlsSource::Pem { cert, key }) => Some((cert.clone(), key.clone())),
        None => {
            let mut read = |field: &str, v: &Option<String>| -> Option<Vec<u8>> {
                let path = format!("tls.{field}");
                let Some(p) = v else {
                    errs.push(path, "missing (path to a PEM file)");
                    return None;
                };
                read_file(base, p, &path, &mut errs)
            };
            let cert = read("cert", &raw_tls.cert);
            let key = read("key", &raw_tls.key);
            cert.zip(key)
        }
    };
    let mut tls_config = None;
    let mut cert_not_after = None;
    let mut client_auth = None;
    let mut cert_digest = [0u8; 32];
    if let Some((cert, key)) = pem {
        let ca = raw_tls
            .client_ca
            .as_deref()
            .and_then(|p| read_file(base, p, "tls.client_ca", &mut errs));
        // The bundle being served, expired meanwhile, does not block the rest of a reload
        // (T6-7, as for the certificate): only a change to one not valid now is refused.
        let running_ca = ctx
            .previous
            .and_then(|p| p.client_auth.as_ref())
            .map(|a| a.ca_digest);
        if let Some(pem) = &ca
            && running_ca != Some(tls::cert_digest(pem))
        {
            check_ca_validity(pem, "tls.client_ca", &mut errs, &mut warnings);
        }
        cert_digest = tls::cert_digest(&cert);
        let running = ctx.previous.map(|p| &p.cert_digest);
        match tls::server_config_with(&cert, &key, min_version, ca.as_deref(), running) {
            Ok((cfg, not_after)) => {
                if let Some(why) = not_after
                    .filter(|t| *t < jiff::Timestamp::now().as_second())
                    .map(|_| "expired")
                {
                    warnings.push(format!(
                        "tls.cert: the certificate being served has {why}; the reload applied everything else; install a current one and reload"
                    ));
                }
                tls_config = Some(cfg);
                cert_not_after = not_after;
                client_auth = ca.as_deref().and_then(|pem| tls::ClientAuth::new(pem).ok());
            }
            Err(e) => errs.push(e.path(), e.to_string()),
        }
    }

    // [upstream]
    let u = &raw.upstream;
    let upstream_url = u.url.as_deref().unwrap_or("http://127.0.0.1:8000");
    let connect_timeout = duration_or(
        &u.connect_timeout,
        "5s",
        "upstream.connect_timeout",
        &mut errs,
    );
    let request_timeout = duration_or(
        &u.request_timeout,
        "60s",
        "upstream.request_timeout",
        &mut errs,
    );
    let pool_idle_timeout = duration_or(
        &u.pool_idle_timeout,
        "1s",
        "upstream.pool_idle_timeout",
        &mut errs,
    );
    let upstream_ca =
        u.ca.as_deref()
            .and_then(|p| read_file(base, p, "upstream.ca", &mut errs));
    if let Some(pem) = &upstream_ca {
        check_ca_validity(pem, "upstream.ca", &mut errs, &mut warnings);
    }
    let upstream = match Upstream::new(
        upstream_url,
        connect_timeout,
        request_timeout,
        pool_idle_timeout,
        upstream_ca.as_deref(),
    ) {
        Ok(up) => Some(up),
        Err(e) => {
            let path = if e.starts_with("ca:") {
                "upstream.ca"
            } else {
                "upstream.url"
            };
            errs.push(path, e.trim_start_matches("ca:").trim().to_string());
            None
        }
    };
    let forwarding = forwarding::rules(u, &mut errs);

    // [auth]
    let a = &raw.auth;
    let header = header_name(&a.header, "X-API-Key", "auth.header", &mut errs);
    let identity_header = header_name(
        &a.identity_header,
        "X-Keygate-Key-Id",
        "auth.identity_header",
        &mut errs,
    );
    if header == http::header::AUTHORIZATION {
        errs.push(
            "auth.header",
            "Authorization is always accepted as Bearer; choose another header",
        );
    }
    for (name, path) in [
        (&header, "auth.header"),
        (&identity_header, "auth.identity_header"),
    ] {
        if crate::forward::is_hop_by_hop(name) || name == http::header::HOST {
            errs.push(path, format!("{name} cannot be used here"));
        }
    }
    if header == identity_header {
        errs.push("auth.identity_header", "must differ from auth.header");
    }
    let failed_rate = match parse_rate(a.failed_auth_limit.as_deref().unwrap_or("20/min")) {
        Ok(r) => r,
        Err(m) => {
            errs.push("auth.failed_auth_limit", m);
            Rate {
                count: 20,
                period: Duration::from_secs(60),
            }
        }
    };
    let cors_preflight = cors::build(a, &mut errs);
    let default_rate = a
        .default_rate_limit
        .as_deref()
        .and_then(|s| match parse_rate(s) {
            Ok(r) => Some(r),
            Err(m) => {
                errs.push("auth.default_rate_limit", m);
                None
            }
        });
    let verify_concurrency = match a.verify_concurrency {
        Some(0) => {
            errs.push("auth.verify_concurrency", "must be at least 1");
            1
        }
        Some(n) if n > MAX_VERIFY_CONCURRENCY => {
            errs.push(
                "auth.verify_concurrency",
                format!(
                    "must be at most {MAX_VERIFY_CONCURRENCY}: each argon2 verification holds its memory cost (19 MiB at OWASP's), and more hashes at once than CPUs adds memory, not throughput"
                ),
            );
            MAX_VERIFY_CONCURRENCY
        }
        Some(n) => n,
        None => (std::thread::available_parallelism().map_or(1, |n| n.get()) / 2).max(1),
    };
    let failed_max = match a.failed_auth_max_clients {
        Some(n) if n < crate::limits::MIN_TRACKED => {
            errs.push(
                "auth.failed_auth_max_clients",
                format!("must be at least {}", crate::limits::MIN_TRACKED),
            );
            crate::limits::MIN_TRACKED
        }
        Some(n) if n > MAX_FAILED_AUTH_CLIENTS => {
            errs.push(
                "auth.failed_auth_max_clients",
                format!("must be at most {MAX_FAILED_AUTH_CLIENTS} (about 100 bytes each)"),
            );
            MAX_FAILED_AUTH_CLIENTS
        }
        Some(n) => n,
        None => crate::limits::MAX_TRACKED,
    };
    let failed_auth = match ctx.previous {
        Some(prev)
            if prev.auth.failed_auth.rate() == failed_rate
                && prev.auth.failed_auth.max_clients() == failed_max =>
        {
            prev.auth.failed_auth.clone()
        }
        // A changed limit keeps each client's outstanding failures (fresh user T8-1: a
        // reload handed every throttled address a new budget).
        Some(prev) => Arc::new(FailedAuthThrottle::carried_over(
            &prev.auth.failed_auth,
            failed_rate,
            failed_max,
        )),
        None => Arc::new(FailedAuthThrottle::with_capacity(failed_rate, failed_max)),
    };

    // [access]
    let access = AccessRules::new(
        cidr_list(&raw.access.allow, "access.allow", &mut errs),
        cidr_list(&raw.access.deny, "access.deny", &mut errs),
        cidr_list(
            &raw.access.trusted_proxies,
            "access.trusted_proxies",
            &mut errs,
        ),
    );

    if server.proxy_protocol && raw.access.trusted_proxies.is_empty() {
        errs.push(
            "server.proxy_protocol",
            "needs access.trusted_proxies: only those peers may send a PROXY protocol header",
        );
    }
    let http_proxies = cidr_list(
        &raw.access.trusted_http_proxies,
        "access.trusted_http_proxies",
        &mut errs,
    );
    let access = if server.proxy_protocol {
        let access = access.behind_proxy_protocol(http_proxies);
        if access.http_proxies_overlap_balancers() {
            errs.push(
                "access.trusted_http_proxies",
                "overlaps access.trusted_proxies: a client behind the load balancers, inside that range, could name any address in X-Forwarded-For; list only the HTTP proxies in front of the balancers",
            );
        }
        access
    } else {
        if !raw.access.trusted_http_proxies.is_empty() {
            errs.push(
                "access.trusted_http_proxies",
                "only applies with server.proxy_protocol = true (without it, access.trusted_proxies lists the proxies whose X-Forwarded-For is believed)",
            );
        }
        access
    };

    // [roles.NAME], [[keys]]
    let roles = roles::build_roles(&raw.roles, &mut errs);
    let keys = keys::build_keys(
        &raw.keys,
        &roles,
        keys::KeyDefaults {
            rate: default_rate,
            max_concurrent: caps.default_max_concurrent,
        },
        ctx.previous,
        ctx.in_flight,
        &mut errs,
        &mut warnings,
    );
    if keys.is_empty() && errs.0.is_empty() {
        warnings.push("no [[keys]] configured: every request will get 401".to_string());
    }

    // [log]
    let l = &raw.log;
    let json = match l.format.as_deref().unwrap_or("json") {
        "json" => true,
        "text" => false,
        other => {
            errs.push(
                "log.format",
                format!("must be \"json\" or \"text\", not {other:?}"),
            );
            true
        }
    };
    let level = match l
        .level
        .as_deref()
        .unwrap_or("info")
        .parse::<tracing::Level>()
    {
        Ok(l) => l,
        Err(_) => {
            errs.push(
                "log.level",
                "must be one of error, warn, info, debug, trace",
            );
            tracing::Level::INFO
        }
    };
    let mut redact: Vec<String> = BUILTIN_REDACTED_PARAMS
        .iter()
        .map(|s| s.to_string())
        .collect();
    for (i, p) in l.redact_query_params.iter().enumerate() {
        if p.is_empty() {
            errs.push(format!("log.redact_query_params[{i}]"), "must not be empty");
        } else {
            let p = p.to_ascii_lowercase();
            if !redact.contains(&p) {
                redact.push(p);
            }
        }
    }

    let client_event_limit = match parse_rate(l.client_event_limit.as_deref().unwrap_or("10/min")) {
        Ok(r) => r,
        Err(m) => {
            errs.push("log.client_event_limit", m);
            Rate {
                count: 10,
                period: Duration::from_secs(60),
            }
        }
    };

    // [admin]
    let admin = raw.admin.as_ref().map(|a| {
        let text = a.listen.as_deref().unwrap_or("127.0.0.1:9901");
        match text.parse::<SocketAddr>() {
            Ok(addr) => {
                // Port 0 is "any free port": two of them never collide.
                if addr.port() != 0
                    && addr.port() == listen.port()
                    && (addr.ip() == listen.ip()
                        || addr.ip().is_unspecified()
                        || listen.ip().is_unspecified())
                {
                    errs.push("admin.listen", "must not be the public listener's address");
                }
                addr
            }
            Err(_) => {
                errs.push("admin.listen", format!("invalid socket address {text:?}"));
                SocketAddr::from(([127, 0, 0, 1], 9901))
            }
        }
    });

    // [state]
    let state = raw.state.as_ref().and_then(|st| {
        let rotation_period = duration_or(
            &st.rotation_period,
            "90d",
            "state.rotation_period",
            &mut errs,
        );
        match &st.path {
            Some(p) => Some(StateSettings {
                path: resolve(base, p),
                rotation_period,
            }),
            None => {
                errs.push("state.path", "missing");
                None
            }
        }
    });

    // [quota_costs], [key_networks], [introspection]
    let quota_costs = lifecycle::quota_costs(&raw.quota_costs, &keys, &mut errs, &mut warnings);
    let key_networks = lifecycle::key_networks(&raw.key_networks, &mut errs);
    let introspection_path = lifecycle::introspection(&raw.introspection, &mut errs);

    key_ids::name_keys(&mut errs.0, &mut warnings, |i| {
        raw.keys.get(i).map(|k| k.id.clone())
    });

    let cluster = cluster::build(raw.cluster.as_ref(), base, &mut errs);
    // [[webhooks]]; in cluster mode their delivery ids are shared through Redis.
    let webhooks = webhooks::build(
        &raw.webhooks,
        base,
        (ctx.previous, ctx.delivery_stores),
        introspection_path.as_deref(),
        cluster.is_some(),
        &mut errs,
        &mut warnings,
    );

    if !errs.0.is_empty() {
        return Err(ConfigErrors(errs.0));
    }
    let (Some(tls), Some(upstream)) = (tls_config, upstream) else {
        return Err(ConfigErrors::one("", "internal: incomplete snapshot"));
    };
    Ok(Snapshot {
        server,
        tls,
        cert_digest,
        client_auth,
        cert_not_after,
        upstream,
        forwarding,
        auth: AuthSettings {
            header,
            identity_header,
            failed_auth,
            verify_concurrency,
            cors_preflight,
        },
        access,
        keys,
        log: LogSettings {
            json,
            level,
            redact_query_params: redact,
            client_event_limit,
        },
        admin,
        state,
        quota_costs,
        key_networks,
        introspection_path,
        upstream_url: upstream_url.to_string(),
        webhooks,
        caps,
        warnings,
        cluster,
        config_hash: raw.fingerprint.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Networks in IPv4-mapped IPv6 form match the IPv4 clients they name (clients are matched
    /// in canonical form), in every list that takes CIDRs.
    #[test]
    fn ipv4_mapped_networks_are_read_as_ipv4() {
        let ip = |s: &str| s.parse::<std::net::IpAddr>().unwrap();
        for (cidr, inside, outside) in [
            ("::ffff:10.0.0.0/104", "10.200.1.2", "11.0.0.1"),
            ("::ffff:192.0.2.7", "192.0.2.7", "192.0.2.8"),
            ("::FFFF:c000:0200/120", "192.0.2.255", "192.0.3.0"),
            ("::ffff:0:0/96", "203.0.113.9", "2001:db8::1"),
        ] {
            let net = parse_cidr(cidr).unwrap();
            assert!(net.contains(&ip(inside)), "{cidr} {inside}");
            assert!(!net.contains(&ip(outside)), "{cidr} {outside}");
            let list = crate::access::IpList::new(vec![net]);
            assert!(list.contains(ip(&format!("::ffff:{inside}"))) || inside.contains(':'));
        }
        assert_eq!(
            parse_cidr("2001:db8::/32").unwrap().to_string(),
            "2001:db8::/32"
        );
    }

    /// Instances of one cluster with per-host addresses (docs/cluster.md's topology) share a
    /// digest; any shared setting changes it.
    #[test]
    fn the_config_digest_ignores_per_instance_settings_only() {
        let file = |listen: &str, admin: &str, workers: u32, instance: &str, rate: &str| {
            format!(
                "# instance {instance}\n[server]\nlisten = \"{listen}\"\nworkers = {workers}\n\
                 [admin]\nlisten = \"{admin}\"\n\
                 [cluster]\nredis = \"redis://10.0.0.5\"\ninstance = \"{instance}\"\n\
                 [auth]\ndefault_rate_limit = \"{rate}\"\n"
            )
        };
        let a = fingerprint(&file("10.0.0.11:8443", "10.0.0.11:9901", 2, "a", "10/s"));
        let b = fingerprint(&file("10.0.0.12:8443", "10.0.0.12:9901", 4, "b", "10/s"));
        assert_eq!(a.len(), 16);
        assert_eq!(a, b);
        let drifted = fingerprint(&file("10.0.0.12:8443", "10.0.0.12:9901", 4, "b", "20/s"));
        assert_ne!(a, drifted);
    }

    #[test]
    fn rates_and_durations() {
        assert_eq!(
            parse_rate("100/s").unwrap(),
            Rate {
                count: 100,
                period: Duration::from_secs(1)
            }
        );
        assert_eq!(
            parse_rate("20/min").unwrap().period,
            Duration::from_secs(60)
        );
        assert_eq!(parse_rate("5/h").unwrap().period, Duration::from_secs(3600));
        assert!(parse_rate("0/s").is_err());
        assert!(parse_rate("10/day").is_err());
        assert!(parse_rate("ten/s").is_err());
        assert_eq!(parse_duration("5m").unwrap(), Duration::from_secs(300));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert!(parse_duration("5 parsecs").is_err());
    }

    #[test]
    fn instants() {
        assert!(parse_instant("2027-01-31T00:00:00Z").is_ok());
        assert!(parse_instant("2027-01-31T00:00:00+02:00").is_ok());
        assert!(parse_instant("2027-01-31").is_ok());
        assert!(parse_instant("2027-01-31T00:00:00").is_err());
    }

    #[test]
    fn unknown_fields_are_named_by_path() {
        let e = parse_str("[server]\nlisten = \"127.0.0.1:1\"\nlisen = 3\n").unwrap_err();
        assert!(
            e.to_string()
                .starts_with("server.lisen: unknown field `lisen`"),
            "{e}"
        );
        let e = parse_str("[[keys]]\nid = \"a\"\nhash = \"x\"\n[[keys]]\nid = \"b\"\nhash = 3\n")
            .unwrap_err();
        // The key's id is named too, when it is a valid id.
        assert!(e.to_string().starts_with("keys[1].hash (id \"b\"):"), "{e}");
        let e = parse_str("[server]\nmax_body_bytes = \"s3cr\\\"et\"\n").unwrap_err();
        assert_eq!(
            e.to_string(),
            "server.max_body_bytes: invalid type: a string, expected u64 (line 2)"
        );
    }
}
