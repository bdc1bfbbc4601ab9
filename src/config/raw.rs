//! The TOML file as written by the operator: plain serde types, no interpretation.
//!
//! Everything that needs parsing (CIDRs, durations, rates, hashes, instants) stays a string here
//! and is parsed in `build.rs`, so that *every* problem can be reported at once with its TOML
//! path, instead of serde stopping at the first.

use serde::Deserialize;

pub use super::secret::SecretRef;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    #[serde(default)]
    pub server: RawServer,
    pub tls: Option<RawTls>,
    #[serde(default)]
    pub upstream: RawUpstream,
    #[serde(default)]
    pub auth: RawAuth,
    #[serde(default)]
    pub access: RawAccess,
    #[serde(default)]
    pub keys: Vec<RawKey>,
    #[serde(default)]
    pub log: RawLog,
    pub admin: Option<RawAdmin>,
    pub state: Option<RawState>,
    /// `[roles.NAME]`, in name order (so errors come out in a stable order).
    #[serde(default)]
    pub roles: std::collections::BTreeMap<String, RawRole>,
    #[serde(default)]
    pub quota_costs: RawQuotaCosts,
    #[serde(default)]
    pub key_networks: RawKeyNetworks,
    #[serde(default)]
    pub introspection: RawIntrospection,
    pub cluster: Option<RawCluster>,
    /// SHA-256 of the file's canonical form (see `parse_str`); not a TOML field.
    #[serde(skip)]
    pub fingerprint: String,
    #[serde(default)]
    pub webhooks: Vec<RawWebhook>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawServer {
    pub listen: Option<String>,
    pub workers: Option<usize>,
    pub max_body_bytes: Option<u64>,
    pub max_header_bytes: Option<usize>,
    pub header_read_timeout: Option<String>,
    pub body_read_timeout: Option<String>,
    pub tls_handshake_timeout: Option<String>,
    pub idle_timeout: Option<String>,
    pub max_connections: Option<usize>,
    pub max_connections_per_ip: Option<usize>,
    pub request_buffer_bytes: Option<usize>,
    pub request_buffer_timeout: Option<String>,
    pub send_timeout: Option<String>,
    pub shutdown_grace: Option<String>,
    pub h2_max_concurrent_streams: Option<u32>,
    pub hsts: Option<Hsts>,
    pub proxy_protocol: Option<bool>,
}

/// `hsts = "max-age=…"` or `hsts = false`.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Hsts {
    Enabled(bool),
    Value(String),
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTls {
    pub cert: Option<String>,
    pub key: Option<String>,
    pub min_version: Option<String>,
    pub client_ca: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawUpstream {
    pub url: Option<String>,
    pub connect_timeout: Option<String>,
    pub request_timeout: Option<String>,
    pub pool_idle_timeout: Option<String>,
    pub ca: Option<String>,
    /// `"client"` (default) or `"upstream"`.
    pub host: Option<String>,
    pub upgrade_protocols: Option<Vec<String>>,
    pub max_connections: Option<usize>,
    pub queue_timeout: Option<String>,
    pub tunnel_idle_timeout: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAuth {
    pub header: Option<String>,
    pub identity_header: Option<String>,
    pub failed_auth_limit: Option<String>,
    pub failed_auth_max_clients: Option<usize>,
    pub default_rate_limit: Option<String>,
    pub verify_concurrency: Option<usize>,
    pub default_max_concurrent: Option<u32>,
    pub cors_preflight: Option<String>,
    pub cors_preflight_limit: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAccess {
    #[serde(default)]
    pub allow: Vec<String>,
    #[serde(default)]
    pub deny: Vec<String>,
    #[serde(default)]
    pub trusted_proxies: Vec<String>,
    #[serde(default)]
    pub trusted_http_proxies: Vec<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawKey {
    pub id: String,
    pub hash: String,
    pub role: Option<String>,
    pub quota: Option<String>,
    pub rotation_period: Option<String>,
    pub rate_limit: Option<String>,
    pub burst: Option<u32>,
    pub max_concurrent: Option<u32>,
    pub allow: Option<Vec<String>>,
    pub methods: Option<Vec<String>>,
    pub paths: Option<Vec<String>>,
    pub expires: Option<Instant>,
    pub created: Option<Instant>,
    #[serde(default)]
    pub disabled: bool,
}

/// A TOML datetime or an RFC 3339 string; both are normalised to text and parsed in build.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Instant {
    Datetime(toml::value::Datetime),
    Text(String),
}

impl Instant {
    pub fn as_text(&self) -> String {
        match self {
            Instant::Datetime(d) => d.to_string(),
            Instant::Text(s) => s.clone(),
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLog {
    pub format: Option<String>,
    pub level: Option<String>,
    #[serde(default)]
    pub redact_query_params: Vec<String>,
    pub client_event_limit: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAdmin {
    pub listen: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawState {
    pub path: Option<String>,
    pub rotation_period: Option<String>,
}

/// `[roles.NAME]`: defaults for the keys that name the role (`role = "NAME"`).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRole {
    pub methods: Option<Vec<String>>,
    pub paths: Option<Vec<String>>,
    pub rate_limit: Option<String>,
    pub burst: Option<u32>,
    pub max_concurrent: Option<u32>,
    pub quota: Option<String>,
    pub allow: Option<Vec<String>>,
    pub rotation_period: Option<String>,
}

/// `[quota_costs]`: what a request costs against its key's quota.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawQuotaCosts {
    pub default: Option<u64>,
    #[serde(default)]
    pub rules: Vec<RawCostRule>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCostRule {
    /// Any method when absent.
    pub methods: Option<Vec<String>>,
    pub path: String,
    pub cost: u64,
}

/// `[key_networks]`: the per-key history of client networks (`key_new_network`).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawKeyNetworks {
    pub ipv4_prefix: Option<u8>,
    pub ipv6_prefix: Option<u8>,
    pub remember: Option<String>,
    pub max_per_key: Option<usize>,
}

/// `[introspection]`: the key holder's own view (`GET /.well-known/keygate/key`).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawIntrospection {
    pub enabled: Option<bool>,
    pub path: Option<String>,
}

/// `[cluster]` (SPEC §11).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCluster {
    pub redis: Option<String>,
    pub password: Option<super::secret::SecretRef>,
    pub key_prefix: Option<String>,
    pub timeout: Option<String>,
    pub on_error: Option<String>,
    pub instance: Option<String>,
}

/// One `[[webhooks]]` route (SPEC §10). Secrets are references ([`SecretRef`]), never literals.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawWebhook {
    pub id: String,
    pub path: String,
    pub scheme: String,
    #[serde(default)]
    pub secrets: Vec<SecretRef>,
    /// A single secret; the same as `secrets = [ … ]` with one entry.
    pub secret: Option<SecretRef>,
    pub header: Option<String>,
    pub methods: Option<Vec<String>>,
    pub max_body_bytes: Option<u64>,
    pub tolerance: Option<String>,
    /// How long an accepted delivery id is remembered (duplicates answered 200 by keygate).
    pub dedupe_window: Option<String>,
    /// At most this many ids remembered per route (memory bound); the oldest go first.
    pub dedupe_max_ids: Option<usize>,
    /// Whether the verified signature header goes on to the upstream (default true).
    pub forward_signature: Option<bool>,
    pub id_from: Option<RawIdFrom>,
    pub allow: Option<Vec<String>>,
    pub rate_limit: Option<String>,
    pub burst: Option<u32>,
}

/// `id_from = { header = "X-Delivery-Id" }` or `id_from = { json = "request_id" }`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawIdFrom {
    pub header: Option<String>,
    pub json: Option<String>,
}
