//! Structured logs: one JSON object per line on stdout (or human text), the access record, and
//! query-string redaction.
//!
//! The JSON layer is ours rather than tracing-subscriber's because SPEC §7 wants the fields as
//! top-level keys with `ts` first and JSON `null` for absent values (`key_id`, `upstream_status`),
//! and because it can write each line with one reused buffer. Lines go through a non-blocking
//! writer thread (never lossy: a full queue waits rather than dropping security events).
//!
//! Nothing secret is ever handed to `tracing`: credentials are never fields, the path is logged
//! through [`RedactedPath`], and header maps are never logged at all.

use std::cell::RefCell;
use std::fmt::{self, Write as _};
use std::io::Write as _;
use std::net::IpAddr;
use std::time::Instant;

use http::uri::PathAndQuery;
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_appender::non_blocking::{NonBlocking, WorkerGuard};
use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::{Layer, reload};

/// Keeps the log writer alive; drop it last (flushes buffered lines).
pub struct LogGuard {
    _guard: WorkerGuard,
    level: reload::Handle<Targets, tracing_subscriber::Registry>,
}

impl LogGuard {
    /// Applies a new level from a reloaded config.
    pub fn set_level(&self, level: tracing::Level) {
        let _ = self.level.modify(|f| *f = filter_for(level));
    }
}

/// keygate's own events at the configured level; dependencies (hyper, h2, rustls, …) only at
/// `warn` and above, so a verbose level never turns their internals into log volume. The `log`
/// crate is deliberately not bridged: nothing reaches the log that keygate did not choose to say.
fn filter_for(level: tracing::Level) -> Targets {
    Targets::new()
        .with_default(LevelFilter::from_level(level).min(LevelFilter::WARN))
        .with_target("keygate", level)
}

/// Installs the global subscriber. `json = false` gives compact human-readable text.
pub fn init(json: bool, level: tracing::Level) -> LogGuard {
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(false)
        .buffered_lines_limit(64 * 1024)
        .finish(std::io::BufWriter::with_capacity(
            64 * 1024,
            std::io::stdout(),
        ));
    let (filter, handle) = reload::Layer::new(filter_for(level));
    let registry = tracing_subscriber::registry()
        .with(filter)
        .with(DependencyBudget);
    if json {
        let _ = tracing::subscriber::set_global_default(registry.with(JsonLayer { writer }));
    } else {
        let subscriber = registry.with(
            tracing_subscriber::fmt::layer()
                .with_writer(writer)
                .with_ansi(false)
                .with_target(false)
                .compact(),
        );
        let _ = tracing::subscriber::set_global_default(subscriber);
    }
    LogGuard {
        _guard: guard,
        level: handle,
    }
}

struct JsonLayer {
    writer: NonBlocking,
}

thread_local! {
    static LINE: RefCell<String> = RefCell::new(String::with_capacity(512));
}

impl<S: Subscriber> Layer<S> for JsonLayer {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        LINE.with(|line| {
            let Ok(mut line) = line.try_borrow_mut() else {
                return; // re-entrant event while formatting: drop rather than deadlock
            };
            line.clear();
            line.push_str("{\"ts\":\"");
            let _ = write!(line, "{:.6}", jiff::Timestamp::now());
            line.push_str("\",\"level\":\"");
            line.push_str(event.metadata().level().as_str());
            line.push('"');
            let mut v = JsonVisitor {
                out: &mut line,
                seen: 0,
            };
            event.record(&mut v);
            let seen = v.seen;
            // Declared but unset fields (`tracing::field::Empty`) are JSON null.
            for (i, f) in event.metadata().fields().iter().enumerate() {
                if i < 64 && seen & (1 << i) == 0 {
                    line.push_str(",\"");
                    line.push_str(f.name());
                    line.push_str("\":null");
                }
            }
            line.push_str("}\n");
            let mut w = self.writer.clone();
            let _ = w.write_all(line.as_bytes());
        });
    }
}

struct JsonVisitor<'a> {
    out: &'a mut String,
    seen: u64,
}

impl JsonVisitor<'_> {
    fn key(&mut self, field: &Field) {
        if field.index() < 64 {
            self.seen |= 1 << field.index();
        }
        self.out.push_str(",\"");
        self.out.push_str(match field.name() {
            "message" => "msg",
            n => n,
        });
        self.out.push_str("\":");
    }
}

impl Visit for JsonVisitor<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.key(field);
        push_json_str(self.out, value);
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.key(field);
        let _ = write!(self.out, "{value}");
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.key(field);
        let _ = write!(self.out, "{value}");
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.key(field);
        if value.is_finite() {
            let _ = write!(self.out, "{value}");
        } else {
            self.out.push_str("null");
        }
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.key(field);
        self.out.push_str(if value { "true" } else { "false" });
    }
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.key(field);
        self.out.push('"');
        let _ = write!(JsonEscape(self.out), "{value:?}");
        self.out.push('"');
    }
}

fn push_json_str(out: &mut String, s: &str) {
    out.push('"');
    let _ = JsonEscape(out).write_str(s);
    out.push('"');
}

/// Escapes what it is given into a JSON string body.
struct JsonEscape<'a>(&'a mut String);

impl fmt::Write for JsonEscape<'_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for c in s.chars() {
            match c {
                '"' => self.0.push_str("\\\""),
                '\\' => self.0.push_str("\\\\"),
                '\n' => self.0.push_str("\\n"),
                '\r' => self.0.push_str("\\r"),
                '\t' => self.0.push_str("\\t"),
                c if (c as u32) < 0x20 || c == '\u{2028}' || c == '\u{2029}' => {
                    let _ = write!(self.0, "\\u{:04x}", c as u32);
                }
                c => self.0.push(c),
            }
        }
        Ok(())
    }
}

/// A request path whose `Display` replaces the values of sensitive query parameters with
/// `REDACTED` (names matched case-insensitively, also when percent-encoded or repeated).
pub struct RedactedPath<'a> {
    pub pq: &'a str,
    pub params: &'a [String],
}

impl fmt::Display for RedactedPath<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Some((path, query)) = self.pq.split_once('?') else {
            return f.write_str(self.pq);
        };
        f.write_str(path)?;
        f.write_str("?")?;
        for (i, pair) in query.split('&').enumerate() {
            if i > 0 {
                f.write_str("&")?;
            }
            let (name, value) = match pair.split_once('=') {
                Some((n, v)) => (n, Some(v)),
                None => (pair, None),
            };
            if value.is_some() && is_sensitive(name, self.params) {
                write!(f, "{name}=REDACTED")?;
            } else {
                f.write_str(pair)?;
            }
        }
        Ok(())
    }
}

/// Redacts a path-and-query to a `String` (for tests and the fuzzer).
pub fn redact_query(pq: &str, params: &[String]) -> String {
    RedactedPath { pq, params }.to_string()
}

fn is_sensitive(name: &str, params: &[String]) -> bool {
    let decoded;
    let name = if name.contains('%') || name.contains('+') {
        decoded = percent_decode_lossy(name);
        decoded.as_str()
    } else {
        name
    };
    let name = name.trim();
    // `token[]`, `api_key[0]`: array forms some frameworks use.
    let name = name.split('[').next().unwrap_or(name);
    params.iter().any(|p| p.eq_ignore_ascii_case(name))
}

fn percent_decode_lossy(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' => {
                // Two hex digits exactly (`u8::from_str_radix` would also take `+a` as 0x0a).
                let hex = |j: usize| b.get(j).and_then(|&c| (c as char).to_digit(16));
                match hex(i + 1).zip(hex(i + 2)).map(|(h, l)| (h * 16 + l) as u8) {
                    Some(v) => {
                        out.push(v);
                        i += 3;
                    }
                    None => {
                        out.push(b'%');
                        i += 1;
                    }
                }
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// One access-log line, filled in along the request and written exactly once, when the response
/// body ends or is dropped (so `bytes_out` and `duration_ms` are true for streamed bodies).
pub struct AccessRecord {
    pub start: Instant,
    pub request_id: http::HeaderValue,
    pub client_ip: IpAddr,
    pub method: http::Method,
    pub path: Option<PathAndQuery>,
    pub status: u16,
    pub key_id: Option<std::sync::Arc<str>>,
    pub upstream_status: Option<u16>,
    pub bytes_in: Option<std::sync::Arc<crate::body::RequestStats>>,
    pub bytes_out: u64,
    /// Held for the redaction list (and so the config the request ran under stays alive).
    pub snapshot: std::sync::Arc<crate::config::Snapshot>,
}

impl AccessRecord {
    pub fn emit(&self) {
        let duration = self.start.elapsed();
        let pq = self.path.as_ref().map_or("/", |p| p.as_str());
        let bytes_in = self.bytes_in.as_ref().map_or(0, |s| s.bytes());
        crate::metrics::global().observe_request(self.status, self.key_id.as_ref(), duration);
        // Refused before any key authenticated: anyone can cause these, so they are budgeted
        // per client (the metric above stays complete). Authenticated requests always log.
        if self.status >= 400
            && self.key_id.is_none()
            && !budget().allow(ClientEvent::AccessRefused, self.client_ip)
        {
            return;
        }
        tracing::info!(
            target: "keygate::access",
            request_id = request_id_str(&self.request_id),
            client_ip = %self.client_ip,
            method = self.method.as_str(),
            path = %RedactedPath { pq, params: &self.snapshot.log.redact_query_params },
            status = self.status,
            bytes_in,
            bytes_out = self.bytes_out,
            duration_ms = duration.as_secs_f64() * 1000.0,
            key_id = self.key_id.as_deref(),
            upstream_status = self.upstream_status,
            "request"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Log lines a client can cause at will (issue 9 §5)

/// The kinds of log line a client can cause at will, each budgeted separately per client (see
/// [`Budget`]). A new client-triggered line gets a kind here and goes through
/// [`client_event!`](crate::log::client_event) (or [`Budget::allow`]); its counter, if it has
/// one, is bumped before and regardless of the budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ClientEvent {
    AuthFailed,
    AuthThrottled,
    AuthBusy,
    IpDenied,
    ScopeDenied,
    RateLimited,
    BodyTooLarge,
    ClientBody,
    ClientTimeout,
    UpgradeFailed,
    UpgradeRefused,
    UpstreamError,
    ProxyProtocol,
    TlsHandshake,
    ConnectionError,
    /// Lines from the HTTP/2 and TLS libraries while serving a client's connection (e.g. h2's
    /// "recv PING ack that we never sent", reset-flood GOAWAYs).
    Protocol,
    /// Access lines of requests refused before any key was authenticated (401, 400, 403, 429
    /// without a key): anyone can cause them. Requests that authenticated are always logged.
    AccessRefused,
}

impl ClientEvent {
    pub const ALL: [ClientEvent; 17] = [
        ClientEvent::AuthFailed,
        ClientEvent::AuthThrottled,
        ClientEvent::AuthBusy,
        ClientEvent::IpDenied,
        ClientEvent::ScopeDenied,
        ClientEvent::RateLimited,
        ClientEvent::BodyTooLarge,
        ClientEvent::ClientBody,
        ClientEvent::ClientTimeout,
        ClientEvent::UpgradeFailed,
        ClientEvent::UpgradeRefused,
        ClientEvent::UpstreamError,
        ClientEvent::ProxyProtocol,
        ClientEvent::TlsHandshake,
        ClientEvent::ConnectionError,
        ClientEvent::Protocol,
        ClientEvent::AccessRefused,
    ];

    /// The name in `log_suppressed` lines and the metric's `event` label.
    pub fn as_str(self) -> &'static str {
        match self {
            ClientEvent::AuthFailed => "auth_failed",
            ClientEvent::AuthThrottled => "auth_throttled",
            ClientEvent::AuthBusy => "auth_busy",
            ClientEvent::IpDenied => "ip_denied",
            ClientEvent::ScopeDenied => "scope_denied",
            ClientEvent::RateLimited => "rate_limited",
            ClientEvent::BodyTooLarge => "body_too_large",
            ClientEvent::ClientBody => "client_body",
            ClientEvent::ClientTimeout => "client_timeout",
            ClientEvent::UpgradeFailed => "upgrade_failed",
            ClientEvent::UpgradeRefused => "upgrade_refused",
            ClientEvent::UpstreamError => "upstream_error",
            ClientEvent::ProxyProtocol => "proxy_protocol",
            ClientEvent::TlsHandshake => "tls_handshake",
            ClientEvent::ConnectionError => "connection_error",
            ClientEvent::Protocol => "protocol",
            ClientEvent::AccessRefused => "access_refused",
        }
    }

    fn index(self) -> usize {
        ClientEvent::ALL
            .iter()
            .position(|k| *k == self)
            .unwrap_or(0)
    }
}

/// Logs a line a client can cause at will, if the client's budget for that kind allows:
/// `client_event!(ClientEvent::AuthFailed, ip, Level::WARN, event = "auth_failed", …)`. The
/// arguments after the level are `tracing::event!`'s. A line whose level is off costs no
/// budget. Counters are the caller's business and stay complete.
macro_rules! client_event {
    ($kind:expr, $ip:expr, $level:expr, $($arg:tt)+) => {
        if tracing::enabled!($level) && $crate::log::budget().allow($kind, $ip) {
            tracing::event!($level, $($arg)+);
        }
    };
}
pub(crate) use client_event;

/// Per-client log budget: within each window (`[log] client_event_limit`, default `"10/min"`:
/// 10 lines per minute), each client (an IPv4 address or IPv6 /64, as the failed-auth
/// throttle counts them) writes at most N lines of each [`ClientEvent`] kind; the rest are
/// counted, not written. At the end of a window one `log_suppressed` line per kind that lost
/// lines says how many, from how many clients, and which client lost the most; the counter
/// `keygate_log_lines_suppressed_total{event}` keeps the running total. Security-event
/// counters (`keygate_auth_failures_total`, …) are bumped before the budget is asked, so they
/// stay complete.
///
/// Bounded in memory: at most [`BUDGET_CLIENTS`] (client, kind) pairs per window; past that,
/// clients not yet in the table share one allowance per kind, so a scan from more addresses
/// than that still writes at most N × (`BUDGET_CLIENTS` + kinds) lines per window. Why a
/// fixed window rather than a token bucket per client: the table is simply emptied when the
/// window ends (no pruning), and the window is also the summary's period.
pub struct Budget {
    state: std::sync::Mutex<BudgetState>,
}

/// (client, kind) pairs tracked per window, ~48 bytes each with hash-table overhead (~0.8 MiB).
pub const BUDGET_CLIENTS: usize = 16_384;

struct BudgetState {
    per_window: u32,
    window: std::time::Duration,
    started: Instant,
    lines: std::collections::HashMap<(u128, u8), u32>,
    /// Per kind this window: lines suppressed, clients that lost lines, the client that lost most.
    suppressed: [KindWindow; ClientEvent::ALL.len()],
}

#[derive(Clone, Copy, Default)]
struct KindWindow {
    lines: u64,
    clients: u32,
    top: Option<(u128, u32)>,
}

/// A client the table has no room for this window: all such share this allowance per kind.
const OVERFLOW_CLIENT: u128 = u128::MAX;

pub fn budget() -> &'static Budget {
    static B: std::sync::OnceLock<Budget> = std::sync::OnceLock::new();
    B.get_or_init(|| Budget {
        state: std::sync::Mutex::new(BudgetState {
            per_window: 10,
            window: std::time::Duration::from_secs(60),
            started: Instant::now(),
            lines: std::collections::HashMap::new(),
            suppressed: Default::default(),
        }),
    })
}

impl Budget {
    fn lock(&self) -> std::sync::MutexGuard<'_, BudgetState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sets N lines per window (`[log] client_event_limit`); at start-up and on reload.
    pub fn configure(&self, limit: crate::limits::Rate) {
        let mut st = self.lock();
        st.per_window = limit.count.max(1);
        st.window = limit.period.max(std::time::Duration::from_secs(1));
    }

    /// True if this client may write one more line of this kind now (and counts it); false
    /// if the line must be dropped (counted as suppressed).
    pub fn allow(&self, kind: ClientEvent, ip: IpAddr) -> bool {
        let mut st = self.lock();
        let ended = st.roll();
        let allowed = st.take(kind, crate::limits::client_key(ip));
        drop(st);
        if !allowed {
            crate::metrics::global().log_suppressed(kind);
        }
        // The summary is a line of keygate's own: written after the lock is released.
        if let Some(ended) = ended {
            summarize(ended);
        }
        allowed
    }

    /// Ends the window if it is over, writing its summary. Called periodically, so a summary
    /// comes even when the flood has stopped.
    pub fn flush(&self) {
        let ended = self.lock().roll();
        if let Some(ended) = ended {
            summarize(ended);
        }
    }
}

impl BudgetState {
    /// Starts a new window if the current one is over; returns the ended window's suppressions.
    fn roll(&mut self) -> Option<(std::time::Duration, [KindWindow; ClientEvent::ALL.len()])> {
        if self.started.elapsed() < self.window {
            return None;
        }
        self.started = Instant::now();
        self.lines.clear();
        if self.lines.capacity() > 4 * 1024 {
            self.lines.shrink_to(1024);
        }
        let ended = std::mem::take(&mut self.suppressed);
        ended
            .iter()
            .any(|k| k.lines > 0)
            .then_some((self.window, ended))
    }

    fn take(&mut self, kind: ClientEvent, client: u128) -> bool {
        let k = kind.index();
        let slot = (client, k as u8);
        let key = if self.lines.contains_key(&slot) || self.lines.len() < BUDGET_CLIENTS {
            slot
        } else {
            (OVERFLOW_CLIENT, k as u8)
        };
        let n = self.lines.entry(key).or_insert(0);
        *n = n.saturating_add(1);
        if *n <= self.per_window {
            return true;
        }
        let lost = *n - self.per_window;
        let w = &mut self.suppressed[k];
        w.lines += 1;
        if lost == 1 {
            w.clients += 1;
        }
        if w.top.is_none_or(|(_, most)| lost > most) {
            w.top = Some((key.0, lost));
        }
        false
    }
}

fn summarize((window, ended): (std::time::Duration, [KindWindow; ClientEvent::ALL.len()])) {
    for (kind, w) in ClientEvent::ALL.iter().zip(ended.iter()) {
        if w.lines == 0 {
            continue;
        }
        let top = w.top.map(|(c, n)| (client_label(c), n));
        tracing::warn!(
            event = "log_suppressed",
            kind = kind.as_str(),
            suppressed = w.lines,
            clients = w.clients,
            top_client = top.as_ref().map(|t| t.0.as_str()),
            top_client_suppressed = top.as_ref().map(|t| t.1),
            window_secs = window.as_secs_f64(),
            "log lines a client can cause were over the per-client budget ([log] client_event_limit); counters are complete"
        );
    }
}

/// A client key as operators read it: the IPv4 address, or the IPv6 /64.
fn client_label(c: u128) -> String {
    if c == OVERFLOW_CLIENT {
        return "(clients past the table's size)".to_string();
    }
    let v6 = std::net::Ipv6Addr::from(c);
    match v6.to_ipv4_mapped() {
        Some(v4) => v4.to_string(),
        None => format!("{v6}/64"),
    }
}

/// Writes each window's `log_suppressed` summary when the window ends, flood or not.
pub async fn summaries() {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        budget().flush();
    }
}

tokio::task_local! {
    /// The client whose connection is being served on this task, so that lines the HTTP/2 and
    /// TLS libraries write while polling it can be charged to that client's budget.
    static SERVING: IpAddr;
}

/// Runs a connection's future with its client known to the log budget (see
/// [`ClientEvent::Protocol`]).
pub fn serving<F: std::future::Future>(
    client: IpAddr,
    f: F,
) -> impl std::future::Future<Output = F::Output> {
    SERVING.scope(client, f)
}

/// Budgets lines from dependencies (not keygate's own targets) written while a client's
/// connection is being polled. Lines outside any connection pass.
struct DependencyBudget;

impl<S: Subscriber> Layer<S> for DependencyBudget {
    fn event_enabled(&self, event: &Event<'_>, _ctx: Context<'_, S>) -> bool {
        if event.metadata().target().starts_with("keygate") {
            return true;
        }
        match SERVING.try_with(|ip| *ip) {
            Ok(ip) => budget().allow(ClientEvent::Protocol, ip),
            Err(_) => true,
        }
    }
}

/// Request ids are always ASCII (validated or generated), so this never fails in practice.
pub fn request_id_str(v: &http::HeaderValue) -> &str {
    v.to_str().unwrap_or("-")
}

/// Writes straight to stderr, for CLI messages before/without the subscriber.
pub fn eprintln_safe(msg: &str) {
    let _ = writeln!(std::io::stderr(), "{msg}");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params() -> Vec<String> {
        crate::config::BUILTIN_REDACTED_PARAMS
            .iter()
            .map(|s| s.to_string())
            .collect()
    }

    #[test]
    fn redacts_sensitive_values_only() {
        let p = params();
        assert_eq!(
            redact_query("/a?api_key=s3cret&x=1", &p),
            "/a?api_key=REDACTED&x=1"
        );
        assert_eq!(redact_query("/a?API_KEY=s3cret", &p), "/a?API_KEY=REDACTED");
        assert_eq!(
            redact_query("/a?api%5Fkey=s3cret", &p),
            "/a?api%5Fkey=REDACTED"
        );
        assert_eq!(
            redact_query("/a?token[]=s3cret&token=t2", &p),
            "/a?token[]=REDACTED&token=REDACTED"
        );
        assert_eq!(redact_query("/a?keep=1&flag", &p), "/a?keep=1&flag");
        assert_eq!(redact_query("/plain", &p), "/plain");
        assert_eq!(redact_query("/a?sig=x=y", &p), "/a?sig=REDACTED");
    }

    /// Found while writing the `redact` fuzz target's oracle: `%+a` is not an escape (a sign is
    /// not a hex digit), so `%+a+token` is the name `% a token`, not `\n token`.
    #[test]
    fn only_two_hex_digits_make_an_escape() {
        let p = params();
        assert_eq!(redact_query("/a?%+a+token=v", &p), "/a?%+a+token=v");
        assert_eq!(redact_query("/a?%-1token=v", &p), "/a?%-1token=v");
        assert_eq!(redact_query("/a?+%74oken=v", &p), "/a?+%74oken=REDACTED");
        assert_eq!(redact_query("/a?token%=v", &p), "/a?token%=v");
    }

    #[test]
    fn json_escaping() {
        let mut s = String::new();
        push_json_str(&mut s, "a\"b\\c\n\u{1}");
        assert_eq!(s, "\"a\\\"b\\\\c\\n\\u0001\"");
    }

    fn state(per_window: u32) -> BudgetState {
        BudgetState {
            per_window,
            window: std::time::Duration::from_secs(60),
            started: Instant::now(),
            lines: std::collections::HashMap::new(),
            suppressed: Default::default(),
        }
    }

    #[test]
    fn budget_is_per_client_and_per_kind_and_summarised() {
        let mut st = state(10);
        let a = crate::limits::client_key("192.0.2.1".parse().unwrap());
        let b = crate::limits::client_key("192.0.2.2".parse().unwrap());
        let written = (0..1000)
            .filter(|_| st.take(ClientEvent::Protocol, a))
            .count();
        assert_eq!(written, 10);
        assert!(
            st.take(ClientEvent::AuthFailed, a),
            "another kind has its own budget"
        );
        assert!(
            st.take(ClientEvent::Protocol, b),
            "another client has its own budget"
        );
        let w = st.suppressed[ClientEvent::Protocol.index()];
        assert_eq!((w.lines, w.clients), (990, 1));
        assert_eq!(w.top, Some((a, 990)));
        assert_eq!(client_label(a), "192.0.2.1");
        assert_eq!(
            client_label(crate::limits::client_key("2001:db8::1".parse().unwrap())),
            "2001:db8::/64"
        );
        // The window ends: its suppressions come out once, and every client starts afresh.
        st.started = Instant::now() - std::time::Duration::from_secs(61);
        let (_, ended) = st.roll().expect("a summary is due");
        assert_eq!(ended[ClientEvent::Protocol.index()].lines, 990);
        assert!(st.take(ClientEvent::Protocol, a));
        assert!(st.roll().is_none());
    }

    #[test]
    fn budget_memory_is_bounded_under_a_scan() {
        let mut st = state(2);
        let mut written = 0;
        for i in 0..(BUDGET_CLIENTS as u128 + 5_000) {
            for _ in 0..3 {
                written += usize::from(st.take(ClientEvent::AuthFailed, i));
            }
        }
        assert_eq!(
            st.lines.len(),
            BUDGET_CLIENTS + 1,
            "the table plus one shared slot"
        );
        assert_eq!(written, 2 * BUDGET_CLIENTS + 2);
    }
}
