//! Process-wide metrics for the admin listener's `/metrics`, kept and rendered by the official
//! Prometheus client (`prometheus-client`) in the Prometheus text exposition format 0.0.4.
//!
//! Labels are key ids of authenticated (so configured) keys, status classes and fixed reason
//! words: nothing a client sends unauthenticated, and nothing secret, can become a label.
//! Updates are atomics; a labelled family takes a read lock except the first time a label set
//! is seen. The hot path does not allocate: key ids are the `Arc<str>` of the loaded key.
//!
//! Adding a metric: a field here, registered in [`Metrics::new`] under its name without the
//! `_total` suffix for counters and with its help text without the final period (the encoder
//! appends both), and a method that the rest of the code calls as
//! `metrics::global().thing(...)`. Label sets with a fixed set of values are created at start
//! so their series are exposed from 0 (alerts can use `increase()` from the first event on);
//! a family labelled by key id appears in the output with its first series.

use std::sync::atomic::AtomicI64;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// The `Content-Type` of what [`Metrics::render`] returns.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

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
/// `protocol`: the upstream broke an HTTP rule keygate relies on (a 101 it was not asked for).
pub const UPSTREAM_ERRORS: [&str; 4] = ["connect", "timeout", "protocol", "other"];
/// Labels of `keygate_upgrades_refused_total`: `h2c` apart (an attempted tunnel past the
/// checks), everything else together, so a client cannot grow the label set.
pub const UPGRADE_REFUSED: [&str; 2] = ["h2c", "other"];
/// Where a client timed out: `body` (no request-body byte within `body_read_timeout`),
/// `request_buffer` (a small body not complete within `request_buffer_timeout`).
/// `send`: a response the client took nothing of for `server.send_timeout` (aborted);
/// `tunnel_idle`: an upgraded connection silent both ways for `upstream.tunnel_idle_timeout`.
pub const CLIENT_TIMEOUTS: [&str; 4] = ["body", "request_buffer", "send", "tunnel_idle"];
/// `keygate_connections_limited_total` reasons (see `conn_limits::Limited`).
pub const CONNECTION_LIMITS: [&str; 4] = ["per_ip", "full", "handshake", "idle"];
/// `keygate_upstream_saturated_total` reasons (see `upstream_cap::Saturated`).
pub const UPSTREAM_SATURATED: [&str; 2] = ["queue_full", "queue_timeout"];
/// `keygate_failed_auth_table_full_total` actions (see `limits::FailedAuthThrottle`).
pub const FAILED_AUTH_TABLE_FULL: [&str; 2] = ["by_network", "refused"];
/// Uses of the request-buffer budget (`keygate_request_buffer_bytes`, `…_exhausted_total`):
/// API requests buffered before forwarding, webhook deliveries read whole.
pub const REQUEST_BUFFER_USES: [&str; 2] = ["api", "webhook"];
const STATUS_CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    status_class: &'static str,
    /// Empty when the request was not authenticated.
    key_id: Option<Arc<str>>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KeyLabel {
    key_id: Arc<str>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct QuotaLabels {
    key_id: Arc<str>,
    period: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProtocolLabel {
    protocol: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PhaseLabel {
    phase: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ActionLabel {
    action: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TableLabel {
    table: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct UseLabel {
    r#use: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EventLabel {
    event: &'static str,
}

/// A webhook route's id (configured, never from the request) and a fixed reason word.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WebhookLabels {
    route: Arc<str>,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabel {
    route: Arc<str>,
}

pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    request_duration: Histogram,
    auth_failures: Family<ReasonLabel, Counter>,
    rate_limited: Family<KeyLabel, Counter>,
    scope_denied: Family<KeyLabel, Counter>,
    auth_throttled: Counter,
    ip_denied: Counter,
    upstream_errors: Family<KindLabel, Counter>,
    upgrades_refused: Family<ProtocolLabel, Counter>,
    upstream_retries: Counter,
    client_timeouts: Family<PhaseLabel, Counter>,
    tunnels_closed: Family<ReasonLabel, Counter>,
    open_connections: Gauge<i64, AtomicI64>,
    config_reloads: Family<ResultLabel, Counter>,
    cert_not_after: Gauge<i64, AtomicI64>,
    quota_exceeded: Family<KeyLabel, Counter>,
    key_new_network: Family<KeyLabel, Counter>,
    upstream_exposed: Gauge<i64, AtomicI64>,
    quota_used: Family<QuotaLabels, Gauge<i64, AtomicI64>>,
    quota_limit: Family<QuotaLabels, Gauge<i64, AtomicI64>>,
    connections_limited: Family<ReasonLabel, Counter>,
    concurrency_limited: Family<KeyLabel, Counter>,
    upstream_saturated: Family<ReasonLabel, Counter>,
    upstream_in_use: Gauge<i64, AtomicI64>,
    upstream_queue: Gauge<i64, AtomicI64>,
    /// argon2 verifications run, by result (issue 9: the per-IP budget holds).
    argon2_verifications: Family<ResultLabel, Counter>,
    verify_refused: Counter,
    verify_waiting: Gauge<i64, AtomicI64>,
    failed_auth_table_full: Family<ActionLabel, Counter>,
    failed_auth_tracked: Family<TableLabel, Gauge<i64, AtomicI64>>,
    request_buffer_bytes: Family<UseLabel, Gauge<i64, AtomicI64>>,
    request_buffer_exhausted: Family<UseLabel, Counter>,
    request_buffer_client_share_spent: Family<UseLabel, Counter>,
    log_suppressed: Family<EventLabel, Counter>,
    cluster_degraded: Gauge<i64, AtomicI64>,
    config_info: Family<HashLabel, Gauge<i64, AtomicI64>>,
    webhook_rejected: Family<WebhookLabels, Counter>,
    webhook_forwarded: Family<RouteLabel, Counter>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HashLabel {
    hash: String,
}

pub fn global() -> &'static Metrics {
    static M: OnceLock<Metrics> = OnceLock::new();
    M.get_or_init(Metrics::new)
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Every metric registered, fixed label sets created at 0, `keygate_up` at 1.
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let up: Gauge<i64, AtomicI64> = Gauge::default();
        up.set(1);
        registry.register("keygate_up", "1 while keygate is serving", up);

        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "keygate_requests",
            "Requests answered, by status class and key id",
            requests.clone(),
        );
        let request_duration = Histogram::new(BUCKETS);
        registry.register(
            "keygate_request_duration_seconds",
            "Time from request head to end of response body",
            request_duration.clone(),
        );
        let auth_failures = Family::<ReasonLabel, Counter>::default();
        for reason in AUTH_REASONS {
            auth_failures
                .get_or_create(&ReasonLabel { reason })
                .inc_by(0);
        }
        registry.register(
            "keygate_auth_failures",
            "Failed authentications, by reason",
            auth_failures.clone(),
        );
        let rate_limited = Family::<KeyLabel, Counter>::default();
        registry.register(
            "keygate_rate_limited",
            "Requests refused by a key's rate limit",
            rate_limited.clone(),
        );
        let scope_denied = Family::<KeyLabel, Counter>::default();
        registry.register(
            "keygate_scope_denied",
            "Requests outside a key's methods or paths",
            scope_denied.clone(),
        );
        let auth_throttled = Counter::default();
        registry.register(
            "keygate_auth_throttled",
            "Requests refused because their IP failed authentication too often",
            auth_throttled.clone(),
        );
        let ip_denied = Counter::default();
        registry.register(
            "keygate_ip_denied",
            "Connections or requests refused by the IP allow/deny lists",
            ip_denied.clone(),
        );
        let open_connections: Gauge<i64, AtomicI64> = Gauge::default();
        registry.register(
            "keygate_open_connections",
            "Client connections open now",
            open_connections.clone(),
        );
        let cert_not_after: Gauge<i64, AtomicI64> = Gauge::default();
        registry.register(
            "keygate_certificate_not_after_seconds",
            "Expiry of the served certificate (unix time)",
            cert_not_after.clone(),
        );
        let upstream_errors = Family::<KindLabel, Counter>::default();
        for kind in UPSTREAM_ERRORS {
            upstream_errors.get_or_create(&KindLabel { kind }).inc_by(0);
        }
        registry.register(
            "keygate_upstream_errors",
            "Upstream failures, by kind",
            upstream_errors.clone(),
        );
        let upgrades_refused = Family::<ProtocolLabel, Counter>::default();
        for protocol in UPGRADE_REFUSED {
            upgrades_refused
                .get_or_create(&ProtocolLabel { protocol })
                .inc_by(0);
        }
        registry.register(
            "keygate_upgrades_refused",
            "Client Upgrade requests not forwarded (h2c, or a protocol not in upstream.upgrade_protocols)",
            upgrades_refused.clone(),
        );
        let upstream_retries = Counter::default();
        registry.register(
            "keygate_upstream_retries",
            "Requests sent again on a new upstream connection after a reused one failed before answering",
            upstream_retries.clone(),
        );
        let client_timeouts = Family::<PhaseLabel, Counter>::default();
        for phase in CLIENT_TIMEOUTS {
            client_timeouts
                .get_or_create(&PhaseLabel { phase })
                .inc_by(0);
        }
        registry.register(
            "keygate_client_timeouts",
            "Requests ended because the client stalled, by phase (body, request_buffer: 408; send: response aborted; tunnel_idle: upgraded connection closed)",
            client_timeouts.clone(),
        );
        let tunnels_closed = Family::<ReasonLabel, Counter>::default();
        for why in crate::tunnel::Closed::ALL {
            tunnels_closed
                .get_or_create(&ReasonLabel {
                    reason: why.as_str(),
                })
                .inc_by(0);
        }
        registry.register(
            "keygate_tunnels_closed",
            "Upgraded connections (WebSocket) keygate closed, by reason: access taken away by a reload or the key's expiry (ip_denied, client_cert, key_removed, key_replaced, key_disabled, key_expired, key_ip_denied, scope_denied, upgrade_refused), or shutdown",
            tunnels_closed.clone(),
        );
        let config_reloads = Family::<ResultLabel, Counter>::default();
        for result in ["success", "failure"] {
            config_reloads
                .get_or_create(&ResultLabel { result })
                .inc_by(0);
        }
        registry.register(
            "keygate_config_reloads",
            "Config reloads, by result",
            config_reloads.clone(),
        );
        let quota_exceeded = Family::<KeyLabel, Counter>::default();
        registry.register(
            "keygate_quota_exceeded",
            "Requests refused by the key's quota (used up, or less left than the request costs)",
            quota_exceeded.clone(),
        );
        let key_new_network = Family::<KeyLabel, Counter>::default();
        registry.register(
            "keygate_key_new_network",
            "Authenticated requests from a client network outside the key's recent history",
            key_new_network.clone(),
        );
        let upstream_exposed: Gauge<i64, AtomicI64> = Gauge::default();
        registry.register(
            "keygate_upstream_exposed",
            "1 if the upstream's port accepted a connection on a host address other than loopback at the last check",
            upstream_exposed.clone(),
        );
        let quota_used = Family::<QuotaLabels, Gauge<i64, AtomicI64>>::default();
        registry.register(
            "keygate_quota_used",
            "Quota units used by the key in the current window (set at scrape time)",
            quota_used.clone(),
        );
        let quota_limit = Family::<QuotaLabels, Gauge<i64, AtomicI64>>::default();
        registry.register(
            "keygate_quota_limit",
            "The key's quota per window",
            quota_limit.clone(),
        );
        let argon2_verifications = Family::<ResultLabel, Counter>::default();
        for result in ["wrong", "right"] {
            argon2_verifications
                .get_or_create(&ResultLabel { result })
                .inc_by(0);
        }
        registry.register(
            "keygate_argon2_verifications",
            "argon2 verifications run, by result (a token not in the verified cache)",
            argon2_verifications.clone(),
        );
        let verify_refused = Counter::default();
        registry.register(
            "keygate_verify_refused",
            "Authentications refused (503) by the argon2 queue without hashing: waited too long, or the queue was full of better-placed requests",
            verify_refused.clone(),
        );
        let verify_waiting: Gauge<i64, AtomicI64> = Gauge::default();
        registry.register(
            "keygate_verify_waiting",
            "Authentications waiting for an argon2 thread now",
            verify_waiting.clone(),
        );
        let failed_auth_table_full = Family::<ActionLabel, Counter>::default();
        for action in FAILED_AUTH_TABLE_FULL {
            failed_auth_table_full
                .get_or_create(&ActionLabel { action })
                .inc_by(0);
        }
        registry.register(
            "keygate_failed_auth_table_full",
            "Failed authentications from clients the failed-auth table had no room for: counted by their network (IPv4 /24, IPv6 /48) instead, or refused (429) because the network table was full too",
            failed_auth_table_full.clone(),
        );
        let failed_auth_tracked = Family::<TableLabel, Gauge<i64, AtomicI64>>::default();
        for table in ["clients", "networks"] {
            failed_auth_tracked
                .get_or_create(&TableLabel { table })
                .set(0);
        }
        registry.register(
            "keygate_failed_auth_tracked",
            "Entries in the failed-auth table (clients with recent failures; networks counted as one because the client table was full)",
            failed_auth_tracked.clone(),
        );
        let request_buffer_bytes = Family::<UseLabel, Gauge<i64, AtomicI64>>::default();
        let request_buffer_exhausted = Family::<UseLabel, Counter>::default();
        let request_buffer_client_share_spent = Family::<UseLabel, Counter>::default();
        for r#use in REQUEST_BUFFER_USES {
            request_buffer_client_share_spent
                .get_or_create(&UseLabel { r#use })
                .inc_by(0);
            request_buffer_bytes
                .get_or_create(&UseLabel { r#use })
                .set(0);
            request_buffer_exhausted
                .get_or_create(&UseLabel { r#use })
                .inc_by(0);
        }
        registry.register(
            "keygate_request_buffer_bytes",
            "Bytes of the request-buffer budget reserved now, by use (API request buffering, webhook deliveries read whole)",
            request_buffer_bytes.clone(),
        );
        registry.register(
            "keygate_request_buffer_exhausted",
            "Requests that found their share of the request-buffer budget spent: an API request then streams unbuffered, a webhook delivery is refused 503",
            request_buffer_exhausted.clone(),
        );
        registry.register(
            "keygate_request_buffer_client_share_spent",
            "Requests whose client (address, or API key) already held its share (1/16) of its use's half of the request-buffer budget: an API request then streams unbuffered, a webhook delivery is refused 503",
            request_buffer_client_share_spent.clone(),
        );
        let log_suppressed = Family::<EventLabel, Counter>::default();
        for kind in crate::log::ClientEvent::ALL {
            log_suppressed
                .get_or_create(&EventLabel {
                    event: kind.as_str(),
                })
                .inc_by(0);
        }
        registry.register(
            "keygate_log_lines_suppressed",
            "Log lines a client caused over its per-client budget ([log] client_event_limit), not written, by event kind",
            log_suppressed.clone(),
        );
        let cluster_degraded: Gauge<i64, AtomicI64> = Gauge::default();
        registry.register(
            "keygate_cluster_degraded",
            "1 while cluster mode cannot use Redis (limits are per instance, or refused with on_error = deny)",
            cluster_degraded.clone(),
        );
        let config_info = Family::<HashLabel, Gauge<i64, AtomicI64>>::default();
        registry.register(
            "keygate_config_info",
            "Digest of the loaded config (1 for the one in effect); instances of a cluster should agree",
            config_info.clone(),
        );
        let webhook_rejected = Family::<WebhookLabels, Counter>::default();
        registry.register(
            "keygate_webhook_rejected",
            "Webhook deliveries refused or answered as duplicates, by route and reason",
            webhook_rejected.clone(),
        );
        let webhook_forwarded = Family::<RouteLabel, Counter>::default();
        registry.register(
            "keygate_webhook_forwarded",
            "Verified webhook deliveries forwarded to the upstream, by route",
            webhook_forwarded.clone(),
        );
        let connections_limited = Family::<ReasonLabel, Counter>::default();
        for reason in CONNECTION_LIMITS {
            connections_limited
                .get_or_create(&ReasonLabel { reason })
                .inc_by(0);
        }
        registry.register(
            "keygate_connections_limited",
            "Client connections refused (per_ip, full) or closed to make room (handshake, idle) by the connection table",
            connections_limited.clone(),
        );
        let concurrency_limited = Family::<KeyLabel, Counter>::default();
        registry.register(
            "keygate_concurrency_limited",
            "Requests refused because their key had max_concurrent requests in flight",
            concurrency_limited.clone(),
        );
        let upstream_saturated = Family::<ReasonLabel, Counter>::default();
        for reason in UPSTREAM_SATURATED {
            upstream_saturated
                .get_or_create(&ReasonLabel { reason })
                .inc_by(0);
        }
        registry.register(
            "keygate_upstream_saturated",
            "Requests refused with 503 because upstream.max_connections stayed in use",
            upstream_saturated.clone(),
        );
        let upstream_in_use: Gauge<i64, AtomicI64> = Gauge::default();
        registry.register(
            "keygate_upstream_connections_in_use",
            "Requests holding an upstream connection now (at most upstream.max_connections)",
            upstream_in_use.clone(),
        );
        let upstream_queue: Gauge<i64, AtomicI64> = Gauge::default();
        registry.register(
            "keygate_upstream_queue",
            "Requests waiting for an upstream connection now",
            upstream_queue.clone(),
        );
        Self {
            connections_limited,
            concurrency_limited,
            upstream_saturated,
            upstream_in_use,
            upstream_queue,
            registry,
            quota_exceeded,
            key_new_network,
            upstream_exposed,
            quota_used,
            quota_limit,
            argon2_verifications,
            verify_refused,
            verify_waiting,
            failed_auth_table_full,
            failed_auth_tracked,
            request_buffer_bytes,
            request_buffer_exhausted,
            request_buffer_client_share_spent,
            log_suppressed,
            cluster_degraded,
            config_info,
            webhook_rejected,
            webhook_forwarded,
            requests,
            request_duration,
            auth_failures,
            rate_limited,
            scope_denied,
            auth_throttled,
            ip_denied,
            upstream_errors,
            upgrades_refused,
            upstream_retries,
            client_timeouts,
            tunnels_closed,
            open_connections,
            config_reloads,
            cert_not_after,
        }
    }

    /// One answered request: `status` is the HTTP status sent, `key_id` the authenticated key
    /// (None when there was none), `took` from request head to end of response body.
    pub fn observe_request(&self, status: u16, key_id: Option<&Arc<str>>, took: Duration) {
        let class = usize::from((status / 100).clamp(1, 5)) - 1;
        self.requests
            .get_or_create(&RequestLabels {
                status_class: STATUS_CLASSES[class],
                key_id: key_id.cloned(),
            })
            .inc();
        self.request_duration.observe(took.as_secs_f64());
    }

    /// `reason` is one of [`AUTH_REASONS`]; anything else is not counted.
    pub fn auth_failed(&self, reason: &str) {
        if let Some(reason) = AUTH_REASONS.iter().find(|r| **r == reason) {
            self.auth_failures
                .get_or_create(&ReasonLabel { reason })
                .inc();
        }
    }
    /// `key_id` is the id of a configured key that authenticated.
    pub fn rate_limited(&self, key_id: &Arc<str>) {
        self.rate_limited
            .get_or_create(&KeyLabel {
                key_id: key_id.clone(),
            })
            .inc();
    }
    /// `key_id` is the id of a configured key that authenticated.
    pub fn scope_denied(&self, key_id: &Arc<str>) {
        self.scope_denied
            .get_or_create(&KeyLabel {
                key_id: key_id.clone(),
            })
            .inc();
    }
    pub fn auth_throttled(&self) {
        self.auth_throttled.inc();
    }
    /// A request refused because its key's quota is used up (`key_id`: a configured key).
    pub fn quota_exceeded(&self, key_id: &Arc<str>) {
        self.quota_exceeded
            .get_or_create(&KeyLabel {
                key_id: key_id.clone(),
            })
            .inc();
    }
    /// An authenticated request from a network outside its key's history.
    pub fn key_new_network(&self, key_id: &Arc<str>) {
        self.key_new_network
            .get_or_create(&KeyLabel {
                key_id: key_id.clone(),
            })
            .inc();
    }
    pub fn set_upstream_exposed(&self, exposed: bool) {
        self.upstream_exposed.set(i64::from(exposed));
    }
    /// Replaces the per-key quota gauges: (key id, period, used, limit) for every key with a
    /// quota in the running config. Called at scrape time.
    pub fn set_quotas<'a>(
        &self,
        quotas: impl Iterator<Item = (&'a Arc<str>, &'static str, u64, u64)>,
    ) {
        self.quota_used.clear();
        self.quota_limit.clear();
        for (key_id, period, used, limit) in quotas {
            let labels = QuotaLabels {
                key_id: key_id.clone(),
                period,
            };
            self.quota_used
                .get_or_create(&labels)
                .set(i64::try_from(used).unwrap_or(i64::MAX));
            self.quota_limit
                .get_or_create(&labels)
                .set(i64::try_from(limit).unwrap_or(i64::MAX));
        }
    }
    pub fn ip_denied(&self) {
        self.ip_denied.inc();
    }
    /// `kind` is one of [`UPSTREAM_ERRORS`]; anything else is not counted.
    pub fn upstream_error(&self, kind: &str) {
        if let Some(kind) = UPSTREAM_ERRORS.iter().find(|k| **k == kind) {
            self.upstream_errors
                .get_or_create(&KindLabel { kind })
                .inc();
        }
    }
    /// A client's `Upgrade` that was not forwarded (`proto::upgrade_offer`).
    pub fn upgrade_refused(&self, protocol: &str) {
        let protocol = UPGRADE_REFUSED[usize::from(protocol != "h2c")];
        self.upgrades_refused
            .get_or_create(&ProtocolLabel { protocol })
            .inc();
    }
    /// A request sent again on a new connection after a reused one failed (forward.rs).
    pub fn upstream_retried(&self) {
        self.upstream_retries.inc();
    }
    /// An upgraded connection keygate closed; `reason` is one of [`crate::tunnel::Closed`]'s
    /// words (anything else is not counted).
    pub fn tunnel_closed(&self, reason: &str) {
        if let Some(why) = crate::tunnel::Closed::ALL
            .iter()
            .find(|w| w.as_str() == reason)
        {
            self.tunnels_closed
                .get_or_create(&ReasonLabel {
                    reason: why.as_str(),
                })
                .inc();
        }
    }
    /// `phase` is one of [`CLIENT_TIMEOUTS`]; anything else is not counted.
    pub fn client_timeout(&self, phase: &str) {
        if let Some(phase) = CLIENT_TIMEOUTS.iter().find(|p| **p == phase) {
            self.client_timeouts
                .get_or_create(&PhaseLabel { phase })
                .inc();
        }
    }
    /// `route` is a configured webhook route id; `reason` one of [`crate::webhook::Reason`]'s
    /// words (anything else is not counted).
    pub fn webhook_rejected(&self, route: &Arc<str>, reason: &str) {
        if let Some(reason) = crate::webhook::Reason::ALL
            .iter()
            .map(|r| r.as_str())
            .find(|r| *r == reason)
        {
            self.webhook_rejected
                .get_or_create(&WebhookLabels {
                    route: route.clone(),
                    reason,
                })
                .inc();
        }
    }
    /// `route` is a configured webhook route id.
    pub fn webhook_forwarded(&self, route: &Arc<str>) {
        self.webhook_forwarded
            .get_or_create(&RouteLabel {
                route: route.clone(),
            })
            .inc();
    }
    pub fn connection_opened(&self) {
        self.open_connections.inc();
    }
    pub fn connection_closed(&self) {
        self.open_connections.dec();
    }
    /// `reason` is one of [`CONNECTION_LIMITS`]; anything else is not counted.
    pub fn connection_limited(&self, reason: &str) {
        if let Some(reason) = CONNECTION_LIMITS.iter().find(|r| **r == reason) {
            self.connections_limited
                .get_or_create(&ReasonLabel { reason })
                .inc();
        }
    }
    /// `key_id` is the id of a configured key that authenticated.
    pub fn concurrency_limited(&self, key_id: &Arc<str>) {
        self.concurrency_limited
            .get_or_create(&KeyLabel {
                key_id: key_id.clone(),
            })
            .inc();
    }
    /// `reason` is one of [`UPSTREAM_SATURATED`]; anything else is not counted.
    pub fn upstream_saturated(&self, reason: &str) {
        if let Some(reason) = UPSTREAM_SATURATED.iter().find(|r| **r == reason) {
            self.upstream_saturated
                .get_or_create(&ReasonLabel { reason })
                .inc();
        }
    }
    /// +1 when a request takes an upstream connection permit, -1 when it gives it back.
    pub fn upstream_in_use(&self, delta: i64) {
        self.upstream_in_use.inc_by(delta);
    }
    /// +1 when a request starts waiting for an upstream permit, -1 when it stops.
    pub fn upstream_waiting(&self, delta: i64) {
        self.upstream_queue.inc_by(delta);
    }
    pub fn reloaded(&self, ok: bool) {
        let result = if ok { "success" } else { "failure" };
        self.config_reloads
            .get_or_create(&ResultLabel { result })
            .inc();
    }
    /// Unix seconds of the served certificate's notAfter; None (unknown) exposes 0.
    pub fn set_cert_not_after(&self, unix: Option<i64>) {
        self.cert_not_after.set(unix.unwrap_or(0));
    }
    /// One argon2 verification finished; `ok`: the token was right.
    pub fn argon2_verified(&self, ok: bool) {
        let result = if ok { "right" } else { "wrong" };
        self.argon2_verifications
            .get_or_create(&ResultLabel { result })
            .inc();
    }
    /// The verification queue refused a request without hashing it.
    pub fn verify_refused(&self) {
        self.verify_refused.inc();
    }
    /// Requests waiting in the verification queue now.
    pub fn set_verify_waiting(&self, n: usize) {
        self.verify_waiting
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }
    /// A failed authentication found the failed-auth table full (`by_network` or `refused`).
    pub fn failed_auth_table_full(&self, action: &'static str) {
        self.failed_auth_table_full
            .get_or_create(&ActionLabel { action })
            .inc();
    }
    /// Entries in the failed-auth table now.
    pub fn set_failed_auth_tracked(&self, clients: usize, networks: usize) {
        for (table, n) in [("clients", clients), ("networks", networks)] {
            self.failed_auth_tracked
                .get_or_create(&TableLabel { table })
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
    }
    /// Bytes of the request-buffer budget now reserved for `use` (`api` or `webhook`).
    pub fn set_request_buffer_bytes(&self, r#use: &'static str, bytes: usize) {
        self.request_buffer_bytes
            .get_or_create(&UseLabel { r#use })
            .set(i64::try_from(bytes).unwrap_or(i64::MAX));
    }
    /// A request found its share of the request-buffer budget spent.
    pub fn request_buffer_exhausted(&self, r#use: &'static str) {
        self.request_buffer_exhausted
            .get_or_create(&UseLabel { r#use })
            .inc();
    }
    /// A request's client held its share of the request-buffer budget (`crate::buffer_budget`).
    pub fn request_buffer_client_share_spent(&self, r#use: &'static str) {
        self.request_buffer_client_share_spent
            .get_or_create(&UseLabel { r#use })
            .inc();
    }
    /// A client-caused log line was over its client's budget and not written.
    pub fn log_suppressed(&self, kind: crate::log::ClientEvent) {
        self.log_suppressed
            .get_or_create(&EventLabel {
                event: kind.as_str(),
            })
            .inc();
    }
    pub fn set_cluster_degraded(&self, degraded: bool) {
        self.cluster_degraded.set(i64::from(degraded));
    }
    /// The loaded config's digest: the previous series is removed, so exactly one is exposed.
    pub fn set_config_hash(&self, hash: &str) {
        self.config_info.clear();
        self.config_info
            .get_or_create(&HashLabel { hash: hash.into() })
            .set(1);
    }
    pub fn open_connections(&self) -> i64 {
        self.open_connections.get()
    }

    /// Prometheus text exposition format 0.0.4 ([`CONTENT_TYPE`]).
    pub fn render(&self) -> String {
        let mut o = String::with_capacity(4096);
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::prometheus_text::encode(&mut o, &self.registry);
        o
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_labels_are_the_documented_ones() {
        let m = Metrics::new();
        let id: Arc<str> = Arc::from("metered");
        m.observe_request(204, Some(&id), Duration::from_millis(3));
        m.observe_request(401, None, Duration::from_millis(1));
        m.rate_limited(&id);
        m.scope_denied(&id);
        m.auth_failed("bad_secret");
        m.auth_failed("not-a-reason");
        m.upstream_error("timeout");
        m.upstream_retried();
        m.client_timeout("body");
        m.reloaded(false);
        m.set_cert_not_after(Some(1_900_000_000));
        m.connection_opened();
        let text = m.render();
        for line in [
            "# TYPE keygate_up gauge",
            "keygate_up 1",
            "# TYPE keygate_requests_total counter",
            "keygate_requests_total{status_class=\"2xx\",key_id=\"metered\"} 1",
            "keygate_requests_total{status_class=\"4xx\",key_id=\"\"} 1",
            "# TYPE keygate_request_duration_seconds histogram",
            "keygate_request_duration_seconds_bucket{le=\"0.001\"} 1",
            "keygate_request_duration_seconds_bucket{le=\"0.005\"} 2",
            "keygate_request_duration_seconds_bucket{le=\"+Inf\"} 2",
            "keygate_request_duration_seconds_count 2",
            "keygate_rate_limited_total{key_id=\"metered\"} 1",
            "keygate_scope_denied_total{key_id=\"metered\"} 1",
            "keygate_auth_failures_total{reason=\"bad_secret\"} 1",
            "keygate_auth_failures_total{reason=\"expired\"} 0",
            "# TYPE keygate_auth_throttled_total counter",
            "keygate_ip_denied_total 0",
            "keygate_upstream_errors_total{kind=\"timeout\"} 1",
            "keygate_upstream_errors_total{kind=\"connect\"} 0",
            "keygate_upstream_retries_total 1",
            "keygate_client_timeouts_total{phase=\"body\"} 1",
            "keygate_config_reloads_total{result=\"failure\"} 1",
            "keygate_config_reloads_total{result=\"success\"} 0",
            "# TYPE keygate_open_connections gauge",
            "keygate_open_connections 1",
            "keygate_certificate_not_after_seconds 1900000000",
            "keygate_argon2_verifications_total{result=\"wrong\"} 0",
            "keygate_verify_refused_total 0",
            "keygate_verify_waiting 0",
            "keygate_failed_auth_table_full_total{action=\"by_network\"} 0",
            "keygate_failed_auth_tracked{table=\"clients\"} 0",
            "keygate_request_buffer_bytes{use=\"webhook\"} 0",
            "keygate_request_buffer_exhausted_total{use=\"api\"} 0",
            "keygate_log_lines_suppressed_total{event=\"protocol\"} 0",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing:\n{text}");
        }
        assert!(!text.contains("not-a-reason"), "{text}");
        assert!(!text.contains("_total_total"), "{text}");
        assert!(
            !text.contains("..\n"),
            "help text ends in one period:\n{text}"
        );
    }

    #[test]
    fn label_values_are_escaped() {
        let m = Metrics::new();
        let id: Arc<str> = Arc::from("a\"b\\c\nd");
        m.rate_limited(&id);
        let text = m.render();
        assert!(
            text.contains("keygate_rate_limited_total{key_id=\"a\\\"b\\\\c\\nd\"} 1"),
            "{text}"
        );
    }
}
