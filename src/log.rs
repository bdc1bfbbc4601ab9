//! Structured logs: one JSON object per line on stdout (or human text), the access record, and
//! query-string redaction.
//!
//! The JSON layer is ours rather than tracing-subscriber's because SPEC §7 wants the fields as
//! top-level keys with `ts` first and JSON `null` for absent values (`key_id`, `upstream_status`),
//! and because it can write each line with one reused buffer. Lines are appended to a shared
//! buffer that a writer thread writes out in batches ([`Sink`]): at most [`FLUSH_DELAY`] late,
//! one `write` per batch rather than per line, never lossy (a full buffer makes the logging
//! thread wait rather than drop security events).
//!
//! Nothing secret is ever handed to `tracing`: credentials are never fields, the path is logged
//! through [`RedactedPath`], and header maps are never logged at all.

use std::cell::RefCell;
use std::fmt::{self, Write as _};
use std::io::Write as _;
use std::net::IpAddr;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use http::uri::PathAndQuery;
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::{Layer, reload};

/// Keeps the log writer alive; drop it last (writes out buffered lines, then returns).
pub struct LogGuard {
    sink: Arc<Sink>,
    writer: Option<std::thread::JoinHandle<()>>,
    level: reload::Handle<Targets, tracing_subscriber::Registry>,
}

impl Drop for LogGuard {
    fn drop(&mut self) {
        self.sink.close();
        if let Some(w) = self.writer.take() {
            let _ = w.join();
        }
    }
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
    let (sink, writer) = Sink::start(Box::new(std::io::stdout()));
    let (filter, handle) = reload::Layer::new(filter_for(level));
    let registry = tracing_subscriber::registry().with(filter);
    if json {
        let _ = tracing::subscriber::set_global_default(
            registry.with(JsonLayer { sink: sink.clone() }),
        );
    } else {
        let subscriber = registry.with(
            tracing_subscriber::fmt::layer()
                .with_writer(SinkWriter(sink.clone()))
                .with_ansi(false)
                .with_target(false)
                .compact(),
        );
        let _ = tracing::subscriber::set_global_default(subscriber);
    }
    LogGuard {
        sink,
        writer: Some(writer),
        level: handle,
    }
}

/// Lines wait at most this long before the writer thread writes them out. Batching is what makes
/// a line cheap: one `write` and one thread wake-up per batch instead of per line (with logging
/// on, per-line hand-off cost keygate about 1 futex, 1 `sched_yield` and 1 `write` per request).
/// nginx's `access_log ... buffer= flush=` makes the same trade with a 1 s default flush time.
pub const FLUSH_DELAY: Duration = Duration::from_millis(5);
/// A batch this large is written at once, without waiting for [`FLUSH_DELAY`].
const FLUSH_BYTES: usize = 64 * 1024;
/// Lines not yet written, at most: past this (output stalled, e.g. a full pipe) a logging thread
/// waits for the writer instead of dropping lines or growing without bound.
const MAX_PENDING: usize = 4 * 1024 * 1024;

/// The log buffer shared by every thread that logs, and its writer thread.
pub struct Sink {
    state: Mutex<SinkState>,
    /// Wakes the writer: lines arrived while it was idle, a batch is full, or closing.
    wake: Condvar,
    /// Wakes logging threads waiting for room (`MAX_PENDING`).
    room: Condvar,
}

struct SinkState {
    buf: Vec<u8>,
    /// The writer is waiting for lines (nothing pending).
    idle: bool,
    closed: bool,
}

impl Sink {
    /// Starts the writer thread; lines appended to the returned sink end up in `out`.
    pub fn start(out: Box<dyn std::io::Write + Send>) -> (Arc<Sink>, std::thread::JoinHandle<()>) {
        let sink = Arc::new(Sink {
            state: Mutex::new(SinkState {
                buf: Vec::with_capacity(FLUSH_BYTES),
                idle: false,
                closed: false,
            }),
            wake: Condvar::new(),
            room: Condvar::new(),
        });
        let s = sink.clone();
        let writer = std::thread::Builder::new()
            .name("keygate-log".into())
            .spawn(move || s.write_loop(out))
            .expect("cannot start the log writer thread");
        (sink, writer)
    }

    fn lock(&self) -> MutexGuard<'_, SinkState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Appends whole lines. Waits only while `MAX_PENDING` bytes are already waiting.
    pub fn append(&self, lines: &[u8]) {
        let mut st = self.lock();
        while st.buf.len() >= MAX_PENDING && !st.closed {
            st = self.room.wait(st).unwrap_or_else(|p| p.into_inner());
        }
        let before = st.buf.len();
        st.buf.extend_from_slice(lines);
        if (st.idle && before == 0) || (before < FLUSH_BYTES && st.buf.len() >= FLUSH_BYTES) {
            self.wake.notify_one();
        }
    }

    fn close(&self) {
        self.lock().closed = true;
        self.wake.notify_one();
        self.room.notify_all();
    }

    fn write_loop(&self, mut out: Box<dyn std::io::Write + Send>) {
        let mut batch = Vec::with_capacity(FLUSH_BYTES);
        loop {
            let mut st = self.lock();
            while st.buf.is_empty() && !st.closed {
                st.idle = true;
                st = self.wake.wait(st).unwrap_or_else(|p| p.into_inner());
            }
            st.idle = false;
            if st.buf.is_empty() {
                return; // closed, everything written
            }
            if !st.closed && st.buf.len() < FLUSH_BYTES {
                // Let the lines of the next few milliseconds join this batch.
                st = self
                    .wake
                    .wait_timeout(st, FLUSH_DELAY)
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
            }
            std::mem::swap(&mut st.buf, &mut batch);
            self.room.notify_all();
            drop(st);
            let _ = out.write_all(&batch);
            let _ = out.flush();
            batch.clear();
            if batch.capacity() > 4 * FLUSH_BYTES {
                // A burst is over: do not keep its buffer.
                batch = Vec::with_capacity(FLUSH_BYTES);
            }
        }
    }
}

/// [`Sink`] as the text formatter's writer: it formats each event into one buffer and writes
/// it with one `write_all`, so each call carries whole lines.
struct SinkWriter(Arc<Sink>);

impl std::io::Write for &Sink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.append(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for SinkWriter {
    type Writer = &'a Sink;
    fn make_writer(&'a self) -> Self::Writer {
        &self.0
    }
}

struct JsonLayer {
    sink: Arc<Sink>,
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
            push_timestamp(&mut line, jiff::Timestamp::now());
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
            self.sink.append(line.as_bytes());
        });
    }
}

thread_local! {
    /// The current second as RFC 3339 without its fraction (`2026-01-02T03:04:05`), and which
    /// second that is: formatting a date is done once a second per thread, not once a line.
    static SECOND: RefCell<(i64, String)> = const { RefCell::new((i64::MIN, String::new())) };
}

/// `ts` as RFC 3339 UTC with microseconds (`2026-01-02T03:04:05.123456Z`), as jiff's `{:.6}`.
fn push_timestamp(out: &mut String, now: jiff::Timestamp) {
    let (sec, micros) = if now.subsec_nanosecond() < 0 {
        // Before 1970: jiff counts the fraction towards zero; keep its own formatting.
        let _ = write!(out, "{now:.6}");
        return;
    } else {
        (now.as_second(), now.subsec_microsecond())
    };
    SECOND.with(|c| {
        let mut c = c.borrow_mut();
        if c.0 != sec {
            c.1.clear();
            let _ = write!(c.1, "{:.0}", now);
            // "...:05Z" without the zone designator.
            c.1.pop();
            c.0 = sec;
        }
        out.push_str(&c.1);
    });
    let _ = write!(out, ".{micros:06}Z");
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
        if value.is_finite() && field.name().ends_with("_ms") {
            // Milliseconds to the microsecond, always 3 decimals (`0.710`, not `0.7097019999`).
            let _ = write!(self.out, "{value:.3}");
        } else if value.is_finite() {
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
            // Whole microseconds: exact to 3 decimals in every format (the text format too).
            duration_ms = duration.as_micros() as f64 / 1000.0,
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

    /// A `Write` the tests can read back.
    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Shared {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn timestamps_match_jiffs_microsecond_format() {
        for t in [
            "2026-01-02T03:04:05.000000Z",
            "2026-01-02T03:04:05.999999Z",
            "2026-01-02T03:04:06.000001Z",
            "1970-01-01T00:00:00.5Z",
            "2099-12-31T23:59:59.123456789Z",
        ] {
            let ts: jiff::Timestamp = t.parse().unwrap();
            let mut out = String::new();
            push_timestamp(&mut out, ts);
            assert_eq!(out, format!("{ts:.6}"), "{t}");
        }
    }

    #[test]
    fn json_lines_have_fixed_precision_milliseconds_and_reach_the_output() {
        let out = Shared::default();
        let (sink, writer) = Sink::start(Box::new(out.clone()));
        let layer = JsonLayer { sink: sink.clone() };
        let subscriber = tracing_subscriber::registry().with(layer);
        tracing::subscriber::with_default(subscriber, || {
            for micros in [709_702u64, 1, 12_000_000] {
                tracing::info!(
                    duration_ms = micros as f64 / 1000.0,
                    other = 0.25f64,
                    "request"
                );
            }
        });
        sink.close();
        writer.join().unwrap();
        let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        let durations: Vec<&str> = text
            .lines()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                assert_eq!(v["other"], 0.25);
                let raw = l.split("\"duration_ms\":").nth(1).unwrap();
                &raw[..raw.find(',').unwrap()]
            })
            .collect();
        assert_eq!(durations, ["709.702", "0.001", "12000.000"]);
    }

    /// Lines from several threads all arrive, whole and in each thread's order, including more
    /// than the writer's pending limit while it is slowed down.
    #[test]
    fn sink_keeps_every_line_whole_and_in_order() {
        struct Slow(Shared);
        impl std::io::Write for Slow {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                std::thread::sleep(Duration::from_millis(2));
                self.0.write(buf)
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let out = Shared::default();
        let (sink, writer) = Sink::start(Box::new(Slow(out.clone())));
        let pad = "x".repeat(200);
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let sink = sink.clone();
                let pad = pad.clone();
                std::thread::spawn(move || {
                    for i in 0..8000 {
                        sink.append(format!("{t} {i} {pad}\n").as_bytes());
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        sink.close();
        writer.join().unwrap();
        let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        let mut next = [0u32; 4];
        for l in text.lines() {
            let mut f = l.split(' ');
            let t: usize = f.next().unwrap().parse().unwrap();
            let i: u32 = f.next().unwrap().parse().unwrap();
            assert_eq!(f.next(), Some(pad.as_str()));
            assert_eq!(i, next[t], "thread {t} out of order");
            next[t] += 1;
        }
        assert_eq!(next, [8000; 4]);
    }

    #[test]
    fn json_escaping() {
        let mut s = String::new();
        push_json_str(&mut s, "a\"b\\c\n\u{1}");
        assert_eq!(s, "\"a\\\"b\\\\c\\n\\u0001\"");
    }
}
