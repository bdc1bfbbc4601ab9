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
    let registry = tracing_subscriber::registry().with(filter);
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
}
