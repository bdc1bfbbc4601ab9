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
    let registry = tracing_subscriber::registry()
        .with(filter)
        .with(DependencyBudget);
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
            // A library's line about a client's connection (h2's protocol complaints) names the
            // client, which the library itself does not know.
            if !event.metadata().target().starts_with("keygate")
                && let Ok(ip) = SERVING.try_with(|ip| *ip)
            {
                let _ = write!(line, ",\"client_ip\":\"{ip}\"");
            }
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

/// A request path whose `Display` replaces with `REDACTED`:
///
/// * the values of sensitive query parameters (`params`; names matched case-insensitively,
///   also when percent-encoded or repeated);
/// * any query value, query name or path segment that holds something shaped like a keygate
///   token (SPEC §2, see [`holds_token`]), whatever the parameter is called and however it is
///   percent-encoded: a key pasted into `?x-api-key=`, `?bearer=` or a path never reaches a log.
pub struct RedactedPath<'a> {
    pub pq: &'a str,
    pub params: &'a [String],
}

impl fmt::Display for RedactedPath<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (path, query) = match self.pq.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (self.pq, None),
        };
        if holds_token(path) || path.contains(';') {
            for (i, segment) in path.split('/').enumerate() {
                if i > 0 {
                    f.write_str("/")?;
                }
                if holds_token(segment) {
                    f.write_str("REDACTED")?;
                    continue;
                }
                // Path parameters (`/a;jsessionid=…`, servlet URL rewriting): the value of a
                // secret-bearing name is redacted like a query parameter's.
                let mut params = segment.split(';');
                f.write_str(params.next().unwrap_or_default())?;
                for p in params {
                    match p.split_once('=') {
                        Some((n, _)) if is_sensitive(n, self.params) => {
                            write!(f, ";{n}=REDACTED")?;
                        }
                        _ => write!(f, ";{p}")?,
                    }
                }
            }
        } else {
            f.write_str(path)?;
        }
        let Some(query) = query else {
            return Ok(());
        };
        f.write_str("?")?;
        // `;` separates pairs too (HTML 4's recommendation; some servers still split on it), so
        // `?a=1;password=x` is read as two pairs here: for logs, reading too many pairs can only
        // redact more.
        for piece in query.split_inclusive(['&', ';']) {
            let (pair, sep) = match piece.as_bytes().last() {
                Some(b'&' | b';') => piece.split_at(piece.len() - 1),
                _ => (piece, ""),
            };
            let (name, value) = match pair.split_once('=') {
                Some((n, v)) => (n, Some(v)),
                None => (pair, None),
            };
            if holds_token(name) {
                f.write_str("REDACTED")?;
            } else if value.is_some_and(|v| {
                is_sensitive(name, self.params) || holds_token(v) || nests_secret(v, self.params)
            }) {
                write!(f, "{name}=REDACTED")?;
            } else {
                f.write_str(pair)?;
            }
            f.write_str(sep)?;
        }
        Ok(())
    }
}

/// Whether a query value carries a query of its own with a secret-bearing name in it: a URL
/// passed as a parameter (`?next=/cb?code=…`, `?redirect_uri=https%3A%2F%2Fapp%2Fcb%3Faccess_token%3D…`,
/// as OAuth and login flows do) or a value that is itself a pair (`?q=password=…`). The value is
/// read as it came and percent-decoded up to three times (doubly encoded URLs are common in
/// redirect chains), split at `?`, `&` and `;`, and each `name=` is checked by the same rule as
/// a parameter's name. The whole value is then redacted: cutting out only the nested value
/// would need re-encoding it at the right depth, and the outer name is kept for debugging.
fn nests_secret(v: &str, params: &[String]) -> bool {
    if !v.contains(['=', '%']) {
        return false;
    }
    let carries = |s: &str| {
        s.split(['?', '&', ';']).any(|piece| {
            piece
                .split_once('=')
                .is_some_and(|(n, _)| !n.trim().is_empty() && is_sensitive(n, params))
        })
    };
    any_decoding(v, carries)
}

/// Whether `pred` holds for `s` as it came or for one of its first three percent-decodings
/// (doubly and triply encoded input is common in redirect chains); decoding stops early once
/// nothing changes.
fn any_decoding(s: &str, pred: impl Fn(&str) -> bool) -> bool {
    if pred(s) {
        return true;
    }
    let mut decoded = std::borrow::Cow::Borrowed(s);
    for _ in 0..3 {
        if !decoded.contains('%') {
            break;
        }
        let next = percent_decode_lossy(&decoded);
        if next == *decoded {
            break;
        }
        if pred(&next) {
            return true;
        }
        decoded = std::borrow::Cow::Owned(next);
    }
    false
}

/// Redacts a path-and-query to a `String` (for tests and the fuzzer).
pub fn redact_query(pq: &str, params: &[String]) -> String {
    RedactedPath { pq, params }.to_string()
}

/// Whether `s` (a path segment, query name or value as it came, percent-encoded or not) holds
/// something shaped like a keygate token (SPEC §2): `kg_`, an id of `[a-z0-9-]` (1 to 32),
/// `_`, then at least 38 base62 characters (secret and check). The check digits are not
/// verified: a token with a typo still carries its secret. The prefix is matched in any case.
/// Escapes are decoded (up to three times, for doubly encoded input) before looking.
pub fn holds_token(s: &str) -> bool {
    any_decoding(s, |d| token_shape(d.as_bytes()))
}

fn token_shape(b: &[u8]) -> bool {
    const MIN: usize = 3 + 1 + 1 + 38;
    if b.len() < MIN {
        return false;
    }
    (0..=b.len() - MIN).any(|i| {
        if !b[i..i + 3].eq_ignore_ascii_case(b"kg_") {
            return false;
        }
        let rest = &b[i + 3..];
        let id = rest
            .iter()
            .take_while(|c| c.is_ascii_alphanumeric() || **c == b'-')
            .count();
        (1..=32).contains(&id)
            && rest.get(id) == Some(&b'_')
            && rest[id + 1..]
                .iter()
                .take_while(|c| c.is_ascii_alphanumeric())
                .count()
                >= 38
    })
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
    // The whole name, brackets and all (`user[password]`, `data[client_secret]`), and its
    // first part (`token[]`, `api_key[0]`: array forms some frameworks use).
    let base = name.split('[').next().unwrap_or(name);
    // The operator's names (`[log] redact_query_params`) match in any spelling too:
    // `subscription-key` also covers `Subscription_Key`.
    let same = |a: &str, b: &str| {
        a.bytes()
            .filter(u8::is_ascii_alphanumeric)
            .map(|c| c.to_ascii_lowercase())
            .eq(b
                .bytes()
                .filter(u8::is_ascii_alphanumeric)
                .map(|c| c.to_ascii_lowercase()))
    };
    secret_bearing_name(name)
        || params.iter().any(|p| same(p, base) || same(p, name))
        || (name.contains(['[', ']']) && name.split(['[', ']']).any(secret_bearing_name))
}

/// Whether a query parameter's name says that its value is a credential, whatever its
/// spelling: the name is lowercased and stripped of everything but letters and digits
/// (`client_secret`, `Client-Secret`, `X-Amz-Signature`, `refresh.token` all qualify), then
/// matched against fragments that name a secret anywhere in it (`token`, `secret`, `passw`,
/// `pwd`, `signature`, `apikey`, `credential`, `assertion`, `session`, `sessid`, `privatekey`,
/// `cookie`, `jwt`, `hmac`, `authoriz`, `passphrase`, `passcode`, `userpass`, `bearer`, `cred`,
/// `saml`, `verifier`, `ticket`, `authcode`, `otp`, `mfa`, `githubpat`), names that end in `key`, and
/// short names that are one only alone (`key`, `sig`, `code` (an OAuth authorization code),
/// `pass`, `auth`, `pw`, `psw`, `pin`, `sid`, `pat`). A list of exact names missed
/// `client_secret`, `refresh_token`, `X-Amz-Signature`, `sessionid` and their like; an
/// over-redacted `?session_count=` costs a little debugging, a leaked one a credential. The
/// same rule in the spirit of Sentry's and Django's default scrubbers, which also match by
/// fragment. Bracketed names (`user[password]`) are matched whole and by part by the caller.
pub fn secret_bearing_name(name: &str) -> bool {
    const FRAGMENTS: &[&[u8]] = &[
        b"token",
        b"secret",
        b"passw",
        b"pwd",
        b"signature",
        b"apikey",
        b"credential",
        b"assertion",
        b"session",
        b"sessid",
        b"privatekey",
        b"cookie",
        b"jwt",
        b"hmac",
        b"authoriz",
        b"passphrase",
        b"passcode",
        b"userpass",
        b"bearer",
        b"cred",
        b"saml",
        b"verifier",
        b"ticket",
        b"authcode",
        b"otp",
        b"mfa",
        b"githubpat",
    ];
    const ALONE: &[&[u8]] = &[
        b"key", b"sig", b"code", b"pass", b"auth", b"pw", b"psw", b"pin", b"sid", b"pat",
    ];
    let mut norm = [0u8; 64];
    let mut n = 0;
    for b in name.bytes() {
        if b.is_ascii_alphanumeric() {
            if n == norm.len() {
                // A name this long is not one we know; look at its first 64 letters.
                break;
            }
            norm[n] = b.to_ascii_lowercase();
            n += 1;
        }
    }
    let norm = &norm[..n];
    // `…key` names a key (`apikey`, `accesskey`, `signingkey`, `privatekey`); `monkey` costs
    // a redacted value, which is the safe side.
    ALONE.contains(&norm)
        || norm.ends_with(b"key")
        || FRAGMENTS
            .iter()
            .any(|f| norm.windows(f.len()).any(|w| w == *f))
}

pub(crate) fn percent_decode_lossy(s: &str) -> String {
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

/// How much of a refused, unauthenticated request's path an access line carries (bytes; the
/// rest is counted, `…(+N bytes)`). Anyone can send a 16 KiB target without a key: the log
/// budget bounds such lines to 1,000 a minute per kind, and this bounds their size, so that
/// unauthenticated clients write at most ~1.5 MB of access lines a minute, not ~16 MB. An
/// authenticated request's path is logged whole (its key is accountable for it).
pub const REFUSED_PATH_LOG_BYTES: usize = 1024;

/// How much of a request method an access line carries (bytes): every standard and WebDAV
/// method fits; an extension method can be as long as the head.
pub const METHOD_LOG_BYTES: usize = 32;

/// Writes at most `.1` bytes of `.0`'s text (cut at a character boundary) and then, if anything
/// was left out, `…(+N bytes)` with the number of bytes left out.
pub struct Capped<T>(pub T, pub usize);

impl<T: fmt::Display> fmt::Display for Capped<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        struct W<'a, 'b> {
            f: &'a mut fmt::Formatter<'b>,
            left: usize,
            dropped: usize,
        }
        impl fmt::Write for W<'_, '_> {
            fn write_str(&mut self, s: &str) -> fmt::Result {
                if self.dropped == 0 && s.len() <= self.left {
                    self.left -= s.len();
                    return self.f.write_str(s);
                }
                let mut cut = if self.dropped == 0 { self.left } else { 0 };
                while !s.is_char_boundary(cut) {
                    cut -= 1;
                }
                self.left = 0;
                self.dropped += s.len() - cut;
                self.f.write_str(&s[..cut])
            }
        }
        let mut w = W {
            f,
            left: self.1,
            dropped: 0,
        };
        fmt::write(&mut w, format_args!("{}", self.0))?;
        if w.dropped > 0 {
            let dropped = w.dropped;
            write!(w.f, "…(+{dropped} bytes)")?;
        }
        Ok(())
    }
}

/// Why a response ended before its body was complete: the access line says `completed: false`
/// and `cut_by` names the cause (`status` stays what was sent, `bytes_out` what went out).
/// Like HAProxy's termination state and Envoy's response flags, so that an operator can tell a
/// 200 the client received whole from one it did not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cut {
    /// The client closed the connection (HTTP/1.1) or reset the stream (HTTP/2 `RST_STREAM`)
    /// before the body was sent.
    Client,
    /// keygate closed the connection (HTTP/1.1) or reset the stream (HTTP/2): the client took
    /// nothing of the response for `[server] send_timeout` (`stall.rs`).
    SendTimeout,
    /// The upstream's body failed mid-stream: its connection reset or closed before the body's
    /// end, or a framing error. The client's stream is aborted so it cannot take the truncated
    /// body for a whole one.
    Upstream,
    /// keygate was stopping (SIGTERM/SIGINT) and `[server] shutdown_grace` ran out before the
    /// response was complete: keygate closed the connection. An upgraded connection still open
    /// when the drain ends is closed too (a WebSocket with close code 1001, "going away").
    Shutdown,
    /// The connection table (`conn_limits.rs`) took the connection for a newcomer while keygate
    /// held this request back (a throttled client's pause, a wait for verification): only
    /// connections with no admitted request in flight are reclaimed.
    Reclaimed,
    /// An upgraded connection (WebSocket) that a reload took access away from (its client's
    /// network denied, its client CA replaced, its key removed, replaced, disabled or narrowed),
    /// or whose key expired: keygate closed it (`tunnel.rs`, event `tunnel_closed`).
    Revoked,
    /// An upgraded connection (WebSocket) through which nothing moved either way for
    /// `[upstream] tunnel_idle_timeout`: keygate closed both sides (`client_timeout` event,
    /// `phase: tunnel_idle`).
    TunnelIdle,
}

impl Cut {
    pub fn as_str(self) -> &'static str {
        match self {
            Cut::Client => "client",
            Cut::SendTimeout => "send_timeout",
            Cut::Upstream => "upstream",
            Cut::Shutdown => "shutdown",
            Cut::Reclaimed => "reclaimed",
            Cut::Revoked => "revoked",
            Cut::TunnelIdle => "tunnel_idle",
        }
    }
}

/// One access-log line, filled in along the request and written exactly once, when the response
/// body ends or is dropped (so `bytes_out` and `duration_ms` are true for streamed bodies).
pub struct AccessRecord {
    pub start: Instant,
    pub request_id: http::HeaderValue,
    pub client_ip: IpAddr,
    /// As received, or `REDACTED` when it holds a token (the caller looks).
    pub method: http::Method,
    pub path: Option<PathAndQuery>,
    pub status: u16,
    pub key_id: Option<std::sync::Arc<str>>,
    pub upstream_status: Option<u16>,
    pub bytes_in: Option<std::sync::Arc<crate::body::RequestStats>>,
    pub bytes_out: u64,
    /// Set when the response ended before its body was complete (`completed: false`).
    pub cut: Option<Cut>,
    /// Held for the redaction list (and so the config the request ran under stays alive).
    pub snapshot: std::sync::Arc<crate::config::Snapshot>,
}

impl AccessRecord {
    pub fn emit(&self) {
        let duration = self.start.elapsed();
        let pq = self.path.as_ref().map_or("/", |p| p.as_str());
        let bytes_in = self.bytes_in.as_ref().map_or(0, |s| s.bytes());
        crate::metrics::global().observe_request(self.status, self.key_id.as_ref(), duration);
        // Answered by keygate itself with no key authenticated (refusals; a replayed webhook
        // delivery answered as a duplicate, fresh user T8-9: 2,000 replays wrote 2,000 lines
        // in a second): anyone can cause these, so they are budgeted per client (the metric
        // above stays complete). Authenticated and forwarded requests always log.
        let refused =
            self.key_id.is_none() && (self.status >= 400 || self.upstream_status.is_none());
        if refused && !budget().allow(ClientEvent::AccessRefused, self.client_ip) {
            return;
        }
        let method = self.method.as_str();
        tracing::info!(
            target: "keygate::access",
            request_id = request_id_str(&self.request_id),
            client_ip = %self.client_ip,
            // A token-shaped method is refused (`pipeline::check_protocol`) and recorded as
            // `REDACTED` (`pipeline::handle`), never logged.
            method = %Capped(method, METHOD_LOG_BYTES),
            path = %Capped(
                RedactedPath { pq, params: &self.snapshot.log.redact_query_params },
                if refused { REFUSED_PATH_LOG_BYTES } else { usize::MAX },
            ),
            status = self.status,
            bytes_in,
            bytes_out = self.bytes_out,
            // Whole microseconds: exact to 3 decimals in every format (the text format too).
            duration_ms = duration.as_micros() as f64 / 1000.0,
            key_id = self.key_id.as_deref(),
            upstream_status = self.upstream_status,
            completed = self.cut.is_none(),
            cut_by = self.cut.map(Cut::as_str),
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
    CredentialEcho,
    UpgradeFailed,
    UpgradeRefused,
    UpstreamError,
    ProxyProtocol,
    TlsHandshake,
    ConnectionError,
    /// Lines from the HTTP/2 and TLS libraries while serving a client's connection (e.g. h2's
    /// "recv PING ack that we never sent", reset-flood GOAWAYs).
    Protocol,
    /// Access lines of requests keygate answered itself before any key was authenticated
    /// (401, 400, 403, 429 without a key; a webhook replay answered as a duplicate): anyone
    /// can cause them. Requests that authenticated, or were forwarded, are always logged.
    AccessRefused,
    /// `key_new_network`: a key holder can cause one per network it can send from (an IPv6
    /// holder has many /64s).
    KeyNewNetwork,
    /// Requests refused because shared state (Redis) is unavailable with
    /// `[cluster] on_error = "deny"`: one line per request otherwise.
    ClusterUnavailable,
    /// `webhook_rejected`: anyone who can reach a webhook route can send unsigned or forged
    /// deliveries (`keygate_webhook_rejected_total` counts every one).
    WebhookRejected,
    /// Requests refused by the protocol checks (contradictory authority, CONNECT, TRACE).
    MalformedRequest,
    /// Connections refused or reclaimed at accept (`conn_limits.rs`; also at most one line per
    /// reason per 10 s in all).
    ConnectionLimited,
    /// `accept()` failures (EMFILE and the like), which a connection flood can cause. Counted
    /// under the unspecified address: they name no client.
    AcceptFailed,
    /// `concurrency_limited`: a key over its `max_concurrent`.
    ConcurrencyLimited,
    /// `upstream_saturated`: no upstream connection free within `queue_timeout`.
    UpstreamSaturated,
    /// `quota_insufficient`: a request refused because it costs more than its key's quota has
    /// left (or than the whole quota) while units remain (`quota_exceeded`, once per key and
    /// window, is for the quota used up).
    QuotaInsufficient,
    /// `cors_preflight_limited`: a client over `[auth] cors_preflight_limit`.
    CorsPreflight,
}

impl ClientEvent {
    pub const ALL: [ClientEvent; 28] = [
        ClientEvent::AuthFailed,
        ClientEvent::AuthThrottled,
        ClientEvent::AuthBusy,
        ClientEvent::IpDenied,
        ClientEvent::ScopeDenied,
        ClientEvent::RateLimited,
        ClientEvent::BodyTooLarge,
        ClientEvent::ClientBody,
        ClientEvent::ClientTimeout,
        ClientEvent::CredentialEcho,
        ClientEvent::UpgradeFailed,
        ClientEvent::UpgradeRefused,
        ClientEvent::UpstreamError,
        ClientEvent::ProxyProtocol,
        ClientEvent::TlsHandshake,
        ClientEvent::ConnectionError,
        ClientEvent::Protocol,
        ClientEvent::AccessRefused,
        ClientEvent::KeyNewNetwork,
        ClientEvent::ClusterUnavailable,
        ClientEvent::WebhookRejected,
        ClientEvent::MalformedRequest,
        ClientEvent::ConnectionLimited,
        ClientEvent::AcceptFailed,
        ClientEvent::ConcurrencyLimited,
        ClientEvent::UpstreamSaturated,
        ClientEvent::QuotaInsufficient,
        ClientEvent::CorsPreflight,
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
            ClientEvent::CredentialEcho => "credential_echo",
            ClientEvent::UpgradeFailed => "upgrade_failed",
            ClientEvent::UpgradeRefused => "upgrade_refused",
            ClientEvent::UpstreamError => "upstream_error",
            ClientEvent::ProxyProtocol => "proxy_protocol",
            ClientEvent::TlsHandshake => "tls_handshake",
            ClientEvent::ConnectionError => "connection_error",
            ClientEvent::Protocol => "protocol",
            ClientEvent::AccessRefused => "access_refused",
            ClientEvent::KeyNewNetwork => "key_new_network",
            ClientEvent::ClusterUnavailable => "cluster_unavailable",
            ClientEvent::WebhookRejected => "webhook_rejected",
            ClientEvent::MalformedRequest => "malformed_request",
            ClientEvent::ConnectionLimited => "connection_limited",
            ClientEvent::AcceptFailed => "accept_failed",
            ClientEvent::ConcurrencyLimited => "concurrency_limited",
            ClientEvent::UpstreamSaturated => "upstream_saturated",
            ClientEvent::QuotaInsufficient => "quota_insufficient",
            ClientEvent::CorsPreflight => "cors_preflight_limited",
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
/// Bounded in total too: all clients together write at most [`BUDGET_ALL_CLIENTS_FACTOR`] × N
/// lines of one kind per window (1 000 a minute with the default), so an attacker with many
/// addresses (IPv6 /64s are cheap) cannot turn "N per client" into an unbounded volume; lines
/// refused by that ceiling are counted and summed up (`over_ceiling`) like the others.
///
/// Bounded in memory: at most [`BUDGET_CLIENTS`] (client, kind) pairs per window; past that,
/// clients not yet in the table share one allowance per kind. Why a fixed window rather than
/// a token bucket per client: the table is simply emptied when the window ends (no pruning),
/// and the window is also the summary's period.
pub struct Budget {
    state: std::sync::Mutex<BudgetState>,
}

/// (client, kind) pairs tracked per window, ~48 bytes each with hash-table overhead (~0.8 MiB).
pub const BUDGET_CLIENTS: usize = 16_384;

/// All clients together write at most this many times `[log] client_event_limit`'s count of
/// lines of one kind per window (a fresh user's 3 600 guesses from 3 600 addresses in 30 s
/// wrote 10 530 lines before this ceiling).
pub const BUDGET_ALL_CLIENTS_FACTOR: u32 = 100;

struct BudgetState {
    per_window: u32,
    window: std::time::Duration,
    started: Instant,
    lines: std::collections::HashMap<(u128, u8), u32>,
    /// Per kind this window: lines written (for the all-clients ceiling).
    written: [u32; ClientEvent::ALL.len()],
    /// Per kind this window: lines suppressed, clients that lost lines, the client that lost most.
    suppressed: [KindWindow; ClientEvent::ALL.len()],
}

#[derive(Clone, Copy, Default)]
struct KindWindow {
    lines: u64,
    /// Of `lines`, those refused by the all-clients ceiling while their client was within its
    /// own budget.
    over_ceiling: u64,
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
            written: [0; ClientEvent::ALL.len()],
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
        self.written = [0; ClientEvent::ALL.len()];
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
            let ceiling = self.per_window.saturating_mul(BUDGET_ALL_CLIENTS_FACTOR);
            if self.written[k] < ceiling {
                self.written[k] += 1;
                return true;
            }
            let w = &mut self.suppressed[k];
            w.lines += 1;
            w.over_ceiling += 1;
            return false;
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
            over_ceiling = w.over_ceiling,
            clients = w.clients,
            top_client = top.as_ref().map(|t| t.0.as_str()),
            top_client_suppressed = top.as_ref().map(|t| t.1),
            window_secs = window.as_secs_f64(),
            "log lines clients can cause were over the per-client budget ([log] client_event_limit) or the all-clients ceiling (100 times it); counters are complete"
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

    /// A URL (or a pair) passed as a value carries its own query: a secret-bearing name in it,
    /// raw or percent-encoded once, twice or three times, redacts the value; a nested query
    /// without one is kept.
    #[test]
    fn secrets_in_nested_queries_are_redacted() {
        let p = params();
        for (pq, want) in [
            ("/a?next=/cb?code=S1&x=1", "/a?next=REDACTED&x=1"),
            ("/a?q=password=S2", "/a?q=REDACTED"),
            (
                "/a?redirect_uri=https%3A%2F%2Fapp%2Fcb%3Faccess_token%3DS3",
                "/a?redirect_uri=REDACTED",
            ),
            (
                "/a?r=https%253A%252F%252Fapp%252Fcb%253Fx%253D1%2526client_secret%253DS4&y=2",
                "/a?r=REDACTED&y=2",
            ),
            ("/a?r=x%3Bjsessionid%3DS5", "/a?r=REDACTED"),
            ("/a?next=/cb?page=2&x=1", "/a?next=/cb?page=2&x=1"),
            ("/a?filter=status=open", "/a?filter=status=open"),
            (
                "/a?r=https%3A%2F%2Fapp%2F%3Fa%3D1",
                "/a?r=https%3A%2F%2Fapp%2F%3Fa%3D1",
            ),
            ("/a?e==x", "/a?e==x"),
        ] {
            assert_eq!(redact_query(pq, &p), want, "{pq}");
        }
    }

    /// `Capped` keeps whole characters and says how many bytes it left out.
    #[test]
    fn capped_text_counts_what_it_leaves_out() {
        assert_eq!(Capped("abcdef", 6).to_string(), "abcdef");
        assert_eq!(Capped("abcdef", 4).to_string(), "abcd…(+2 bytes)");
        assert_eq!(Capped("aé", 2).to_string(), "a…(+2 bytes)");
        assert_eq!(Capped("", 0).to_string(), "");
        let p = params();
        let long = format!("/{}?token=s3cret", "a".repeat(2000));
        let out = Capped(
            RedactedPath {
                pq: &long,
                params: &p,
            },
            1024,
        )
        .to_string();
        assert!(
            out.starts_with("/aaa") && out.ends_with("…(+992 bytes)"),
            "{out}"
        );
        assert!(!out.contains("s3cret"));
        let out = Capped(
            RedactedPath {
                pq: &long,
                params: &p,
            },
            usize::MAX,
        )
        .to_string();
        assert!(out.ends_with("?token=REDACTED"), "{out}");
    }

    /// An operator's name matches in any spelling (case, `-`, `_`, `.`).
    #[test]
    fn operator_names_match_in_any_spelling() {
        let mut p = params();
        p.push("x-tenant-pass".into());
        for name in [
            "X_Tenant_Pass",
            "x-tenant-pass",
            "xtenantpass",
            "x.tenant.pass",
        ] {
            assert_eq!(
                redact_query(&format!("/a?{name}=v"), &p),
                format!("/a?{name}=REDACTED"),
                "{name}"
            );
        }
    }

    /// Path parameters (servlet URL rewriting: `/a;jsessionid=…`) are redacted by the same
    /// rule; other path parameters are kept.
    #[test]
    fn secret_path_parameters_are_redacted() {
        let p = params();
        assert_eq!(
            redact_query("/denied;jsessionid=S1/x;v=2?a=1", &p),
            "/denied;jsessionid=REDACTED/x;v=2?a=1"
        );
        assert_eq!(
            redact_query("/a;b;token=t;c=1", &p),
            "/a;b;token=REDACTED;c=1"
        );
        assert_eq!(redact_query("/plain;v=1", &p), "/plain;v=1");
    }

    /// `;` separates pairs too, for redaction.
    #[test]
    fn semicolon_separated_pairs_are_redacted() {
        let p = params();
        assert_eq!(
            redact_query("/a?x=1;password=s3cr3t&y=2;token=t", &p),
            "/a?x=1;password=REDACTED&y=2;token=REDACTED"
        );
        assert_eq!(redact_query("/a?x=1;;&", &p), "/a?x=1;;&");
    }

    /// Secret-bearing names that are on no exact list (found missing: `client_secret`).
    #[test]
    fn secret_bearing_names_are_redacted_in_any_spelling() {
        let p = params();
        for name in [
            "client_secret",
            "Client-Secret",
            "refresh_token",
            "id_token",
            "X-Amz-Signature",
            "X-Amz-Security-Token",
            "X-Amz-Credential",
            "X-Goog-Signature",
            "oauth_signature",
            "sessionid",
            "JSESSIONID",
            "PHPSESSID",
            "passwd",
            "pwd",
            "db_password",
            "pass",
            "auth",
            "authorization",
            "code",
            "otp",
            "client_assertion",
            "oauth_token",
            "api-key",
            "passphrase",
            "pass_phrase",
            "passcode",
            "pw",
            "psw",
            "userpass",
            "user[password]",
            "user%5Bpassword%5D",
            "data[client_secret]",
            "api[key]",
            "sid",
            "ticket",
            "SAMLResponse",
            "code_verifier",
            "auth_code",
            "mfa_code",
            "otp_code",
            "totp",
            "pin",
            "bearer",
            "creds",
            "pat",
            "github_pat",
            "signing_key",
            "AWSAccessKey",
            "private_key",
            "jwt",
            "hmac",
            "x-api-key",
            "apiKey",
            "client%5Fsecret",
            "client+secret",
            "access-token[]",
        ] {
            assert_eq!(
                redact_query(&format!("/cb?{name}=s3cr3tValue&keep=1"), &p),
                format!("/cb?{name}=REDACTED&keep=1"),
                "{name}"
            );
        }
        // Names that only contain a short word are kept: `key` and `code` are secrets alone
        // (and `key` at the end: `monkey` is redacted, the safe side).
        for name in [
            "keyword", "keys", "zipcode", "author", "page", "state", "limit", "spin",
        ] {
            let pq = format!("/cb?{name}=v");
            assert_eq!(redact_query(&pq, &p), pq, "{name}");
        }
    }

    #[test]
    fn token_shaped_values_are_redacted_whatever_the_name() {
        let p = params();
        let t = "kg_scoped_0123456789ABCDEFGHIJKLMNOPQRSTUV0qxrDd";
        for name in ["x-api-key", "access-token", "bearer", "auth", "q", "%61uth"] {
            assert_eq!(
                redact_query(&format!("/public/x?{name}={t}&keep=1"), &p),
                format!("/public/x?{name}=REDACTED&keep=1")
            );
        }
        let enc = t.replace('_', "%5F");
        assert_eq!(redact_query(&format!("/a?x={enc}"), &p), "/a?x=REDACTED");
        let enc2 = t.replace('_', "%255F");
        assert_eq!(redact_query(&format!("/a?x={enc2}"), &p), "/a?x=REDACTED");
        assert_eq!(
            redact_query(&format!("/a?x=Bearer%20{t}"), &p),
            "/a?x=REDACTED"
        );
        assert_eq!(redact_query(&format!("/a?{t}"), &p), "/a?REDACTED");
        assert_eq!(redact_query(&format!("/a?{t}=1"), &p), "/a?REDACTED");
        assert_eq!(
            redact_query(&format!("/files/{t}/x?y=1"), &p),
            "/files/REDACTED/x?y=1"
        );
        assert_eq!(
            redact_query(&format!("/files/{enc}"), &p),
            "/files/REDACTED"
        );
        assert_eq!(
            redact_query(&format!("/f/KG_a_{}", &t[10..]), &p),
            "/f/REDACTED"
        );
        // Not tokens: too short a secret, no id, no prefix.
        for pq in [
            "/a?x=kg_scoped_0123456789",
            "/a?x=kg__0123456789ABCDEFGHIJKLMNOPQRSTUV0qxrDd",
            "/kg_/x?y=kg-scoped-0123456789ABCDEFGHIJKLMNOPQRSTUV0qxrDd",
        ] {
            assert_eq!(redact_query(pq, &p), pq);
        }
    }

    /// Found while writing the `redact` fuzz target's oracle: `%+a` is not an escape (a sign is
    /// not a hex digit), so `%+a+token` is the name `% a token`, not `\n token`.
    #[test]
    fn only_two_hex_digits_make_an_escape() {
        let p = params();
        // `sig` is a secret-bearing name only alone: a wrongly decoded escape would add or
        // remove letters around it.
        assert_eq!(redact_query("/a?%+a+sig=v", &p), "/a?%+a+sig=v");
        assert_eq!(redact_query("/a?%-1sig=v", &p), "/a?%-1sig=v");
        assert_eq!(redact_query("/a?%4b%+sig=v", &p), "/a?%4b%+sig=v");
        assert_eq!(redact_query("/a?+%73ig=v", &p), "/a?+%73ig=REDACTED");
        // Fragments are found whatever surrounds them, escapes included.
        assert_eq!(redact_query("/a?%+a+token=v", &p), "/a?%+a+token=REDACTED");
        assert_eq!(redact_query("/a?token%=v", &p), "/a?token%=REDACTED");
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

    fn state(per_window: u32) -> BudgetState {
        BudgetState {
            per_window,
            window: std::time::Duration::from_secs(60),
            started: Instant::now(),
            lines: std::collections::HashMap::new(),
            written: [0; ClientEvent::ALL.len()],
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
        // All clients together: the ceiling, not 2 per address.
        assert_eq!(written, 2 * BUDGET_ALL_CLIENTS_FACTOR as usize);
    }

    /// Many addresses, each within its own budget, write at most the all-clients ceiling per
    /// kind and window; the rest are counted as `over_ceiling`; other kinds and the next
    /// window are not affected.
    #[test]
    fn budget_holds_in_total_across_many_clients() {
        let mut st = state(10);
        let ceiling = 10 * BUDGET_ALL_CLIENTS_FACTOR as usize;
        let mut written = 0;
        for i in 0..3_600u128 {
            for _ in 0..3 {
                written += usize::from(st.take(ClientEvent::AuthFailed, i));
            }
        }
        assert_eq!(written, ceiling);
        let w = st.suppressed[ClientEvent::AuthFailed.index()];
        assert_eq!(w.lines, 3 * 3_600 - ceiling as u64);
        assert_eq!(w.over_ceiling, w.lines, "no client was over its own budget");
        assert!(
            st.take(ClientEvent::Protocol, 1),
            "another kind has its own ceiling"
        );
        st.started = Instant::now() - std::time::Duration::from_secs(61);
        assert!(st.roll().is_some());
        assert!(
            st.take(ClientEvent::AuthFailed, 7),
            "a new window starts afresh"
        );
    }
}
