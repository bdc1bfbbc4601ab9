//! Process-wide counters for the admin listener's `/metrics` (Prometheus text format).
//!
//! Labels are key ids, status classes and fixed reason words: nothing secret can become a label.
//! Updates are atomics; the per-key table takes a read lock except the first time a key is seen.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, OnceLock, RwLock};
use std::time::Duration;

/// Upper bounds of the request-duration histogram, in seconds.
const BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 30.0,
];
pub const AUTH_REASONS: [&str; 6] = [
    "missing",
    "malformed",
    "unknown_key",
    "bad_secret",
    "disabled",
    "expired",
];
pub const UPSTREAM_ERRORS: [&str; 3] = ["connect", "timeout", "other"];

#[derive(Default)]
pub struct Metrics {
    /// key id ("" for none) → counts per status class 1xx..5xx.
    requests: RwLock<BTreeMap<Arc<str>, Arc<[AtomicU64; 5]>>>,
    duration_buckets: [AtomicU64; BUCKETS.len()],
    duration_count: AtomicU64,
    duration_sum_micros: AtomicU64,
    auth_failures: [AtomicU64; AUTH_REASONS.len()],
    rate_limited: RwLock<BTreeMap<Arc<str>, AtomicU64>>,
    scope_denied: RwLock<BTreeMap<Arc<str>, AtomicU64>>,
    auth_throttled: AtomicU64,
    ip_denied: AtomicU64,
    upstream_errors: [AtomicU64; UPSTREAM_ERRORS.len()],
    open_connections: AtomicI64,
    reloads_ok: AtomicU64,
    reloads_failed: AtomicU64,
    cert_not_after: AtomicI64,
}

pub fn global() -> &'static Metrics {
    static M: OnceLock<Metrics> = OnceLock::new();
    M.get_or_init(Metrics::default)
}

fn bump(map: &RwLock<BTreeMap<Arc<str>, AtomicU64>>, key: &str) {
    if let Some(c) = map.read().unwrap_or_else(|p| p.into_inner()).get(key) {
        c.fetch_add(1, Relaxed);
        return;
    }
    map.write()
        .unwrap_or_else(|p| p.into_inner())
        .entry(Arc::from(key))
        .or_default()
        .fetch_add(1, Relaxed);
}

impl Metrics {
    pub fn observe_request(&self, status: u16, key_id: Option<&str>, took: Duration) {
        let class = usize::from((status / 100).clamp(1, 5)) - 1;
        let key = key_id.unwrap_or("");
        let found = self
            .requests
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(key)
            .cloned();
        let counts = match found {
            Some(c) => c,
            None => self
                .requests
                .write()
                .unwrap_or_else(|p| p.into_inner())
                .entry(Arc::from(key))
                .or_insert_with(|| Arc::new(Default::default()))
                .clone(),
        };
        counts[class].fetch_add(1, Relaxed);
        let secs = took.as_secs_f64();
        if let Some(i) = BUCKETS.iter().position(|b| secs <= *b) {
            self.duration_buckets[i].fetch_add(1, Relaxed);
        }
        self.duration_count.fetch_add(1, Relaxed);
        self.duration_sum_micros
            .fetch_add(took.as_micros() as u64, Relaxed);
    }

    pub fn auth_failed(&self, reason: &str) {
        if let Some(i) = AUTH_REASONS.iter().position(|r| *r == reason) {
            self.auth_failures[i].fetch_add(1, Relaxed);
        }
    }
    pub fn rate_limited(&self, key_id: &str) {
        bump(&self.rate_limited, key_id);
    }
    pub fn scope_denied(&self, key_id: &str) {
        bump(&self.scope_denied, key_id);
    }
    pub fn auth_throttled(&self) {
        self.auth_throttled.fetch_add(1, Relaxed);
    }
    pub fn ip_denied(&self) {
        self.ip_denied.fetch_add(1, Relaxed);
    }
    pub fn upstream_error(&self, kind: &str) {
        if let Some(i) = UPSTREAM_ERRORS.iter().position(|r| *r == kind) {
            self.upstream_errors[i].fetch_add(1, Relaxed);
        }
    }
    pub fn connection_opened(&self) {
        self.open_connections.fetch_add(1, Relaxed);
    }
    pub fn connection_closed(&self) {
        self.open_connections.fetch_sub(1, Relaxed);
    }
    pub fn reloaded(&self, ok: bool) {
        if ok {
            &self.reloads_ok
        } else {
            &self.reloads_failed
        }
        .fetch_add(1, Relaxed);
    }
    pub fn set_cert_not_after(&self, unix: Option<i64>) {
        self.cert_not_after.store(unix.unwrap_or(0), Relaxed);
    }
    pub fn open_connections(&self) -> i64 {
        self.open_connections.load(Relaxed)
    }

    /// Prometheus text exposition format 0.0.4.
    pub fn render(&self) -> String {
        let mut o = String::with_capacity(4096);
        o.push_str("# HELP keygate_up 1 while keygate is serving.\n# TYPE keygate_up gauge\nkeygate_up 1\n");
        o.push_str("# HELP keygate_requests_total Requests answered, by status class and key id.\n# TYPE keygate_requests_total counter\n");
        for (key, counts) in self
            .requests
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            for (i, c) in counts.iter().enumerate() {
                let n = c.load(Relaxed);
                if n > 0 {
                    let _ = writeln!(
                        o,
                        "keygate_requests_total{{status_class=\"{}xx\",key_id=\"{key}\"}} {n}",
                        i + 1
                    );
                }
            }
        }
        o.push_str("# HELP keygate_request_duration_seconds Time from request head to end of response body.\n# TYPE keygate_request_duration_seconds histogram\n");
        let mut cumulative = 0;
        for (b, c) in BUCKETS.iter().zip(&self.duration_buckets) {
            cumulative += c.load(Relaxed);
            let _ = writeln!(
                o,
                "keygate_request_duration_seconds_bucket{{le=\"{b}\"}} {cumulative}"
            );
        }
        let count = self.duration_count.load(Relaxed);
        let _ = writeln!(
            o,
            "keygate_request_duration_seconds_bucket{{le=\"+Inf\"}} {count}"
        );
        let _ = writeln!(
            o,
            "keygate_request_duration_seconds_sum {}",
            self.duration_sum_micros.load(Relaxed) as f64 / 1e6
        );
        let _ = writeln!(o, "keygate_request_duration_seconds_count {count}");
        o.push_str("# HELP keygate_auth_failures_total Failed authentications, by reason.\n# TYPE keygate_auth_failures_total counter\n");
        for (r, c) in AUTH_REASONS.iter().zip(&self.auth_failures) {
            let _ = writeln!(
                o,
                "keygate_auth_failures_total{{reason=\"{r}\"}} {}",
                c.load(Relaxed)
            );
        }
        for (name, help, map) in [
            (
                "keygate_rate_limited_total",
                "Requests refused by a key's rate limit.",
                &self.rate_limited,
            ),
            (
                "keygate_scope_denied_total",
                "Requests outside a key's methods or paths.",
                &self.scope_denied,
            ),
        ] {
            let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} counter");
            for (key, c) in map.read().unwrap_or_else(|p| p.into_inner()).iter() {
                let _ = writeln!(o, "{name}{{key_id=\"{key}\"}} {}", c.load(Relaxed));
            }
        }
        let simple = [
            (
                "keygate_auth_throttled_total",
                "Requests refused because their IP failed authentication too often.",
                "counter",
                self.auth_throttled.load(Relaxed) as i64,
            ),
            (
                "keygate_ip_denied_total",
                "Connections or requests refused by the IP allow/deny lists.",
                "counter",
                self.ip_denied.load(Relaxed) as i64,
            ),
            (
                "keygate_open_connections",
                "Client connections open now.",
                "gauge",
                self.open_connections.load(Relaxed),
            ),
            (
                "keygate_certificate_not_after_seconds",
                "Expiry of the served certificate (unix time).",
                "gauge",
                self.cert_not_after.load(Relaxed),
            ),
        ];
        for (name, help, kind, v) in simple {
            let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}");
        }
        o.push_str("# HELP keygate_upstream_errors_total Upstream failures, by kind.\n# TYPE keygate_upstream_errors_total counter\n");
        for (k, c) in UPSTREAM_ERRORS.iter().zip(&self.upstream_errors) {
            let _ = writeln!(
                o,
                "keygate_upstream_errors_total{{kind=\"{k}\"}} {}",
                c.load(Relaxed)
            );
        }
        // Both results are always exposed (from 0), so alerts can use `increase()` from the
        // first failure on.
        o.push_str("# HELP keygate_config_reloads_total Config reloads, by result.\n# TYPE keygate_config_reloads_total counter\n");
        let _ = writeln!(
            o,
            "keygate_config_reloads_total{{result=\"success\"}} {}",
            self.reloads_ok.load(Relaxed)
        );
        let _ = writeln!(
            o,
            "keygate_config_reloads_total{{result=\"failure\"}} {}",
            self.reloads_failed.load(Relaxed)
        );
        o
    }
}
