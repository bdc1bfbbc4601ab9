//! Configuration: the raw TOML file (`raw`) and the validated runtime [`Snapshot`] (`build`).
//!
//! A snapshot is built once, completely, off to the side, and then shared read-only behind an
//! `Arc`. Hot paths never parse anything; a reload builds a new snapshot and swaps it in.

mod build;
pub mod raw;
pub mod secret;

pub use build::{
    BUILTIN_REDACTED_PARAMS, BuildContext, TlsSource, build, load_file, parse_duration, parse_rate,
    parse_str as raw_from_str, webhook_route,
};

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderName, HeaderValue};

use crate::access::AccessRules;
use crate::auth::Key;
use crate::forward::Upstream;
use crate::limits::FailedAuthThrottle;

/// `[server] max_body_bytes` when unset: 512 MiB. The model deployment takes 300 MiB documents,
/// and a multipart upload of one (or base64 in JSON: +33 %, 400 MiB) must fit with room to
/// spare. Larger bodies get 413 before the upstream is contacted.
pub const DEFAULT_MAX_BODY_BYTES: u64 = 512 * 1024 * 1024;

/// One problem in a config file, named by its TOML path (`keys[2].allow[0]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub path: String,
    pub message: String,
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.path.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

/// Every problem found in a config file. Messages never contain secret values.
#[derive(Debug, Clone, Default, thiserror::Error)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl std::fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl ConfigErrors {
    pub fn one(path: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigErrors(vec![ConfigError::new(path, message)])
    }
}

impl ConfigError {
    /// Messages quote what the operator wrote, and that may be a secret pasted into the wrong
    /// field (`id = "$argon2id$…"` with `id` and `hash` swapped, a plaintext token as an id).
    /// Every error is made here, so such text is masked before `check`, a reload log or anyone
    /// else can print it. Found by the `config` fuzz target.
    pub fn new(path: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError {
            path: scrub_secrets(&path.into()),
            message: scrub_secrets(&message.into()),
        }
    }
}

/// Masks argon2 PHC strings (`$argon2…` up to the end of the PHC characters) and the secret
/// part of `kg_<id>_<secret>` tokens. keygate's own PHC format hint is left as it is.
pub fn scrub_secrets(text: &str) -> String {
    let hint = crate::auth::PHC_FORMAT_HINT;
    text.split(hint)
        .map(scrub_piece)
        .collect::<Vec<_>>()
        .join(hint)
}

fn scrub_piece(s: &str) -> String {
    let is_phc = |c: &u8| c.is_ascii_alphanumeric() || b"$=,+/.-".contains(c);
    let is_id = |c: &u8| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-';
    let mut out = String::with_capacity(s.len());
    let mut i = 0;
    while let Some(rest) = s.get(i..).filter(|r| !r.is_empty()) {
        if rest.starts_with("$argon2") {
            out.push_str("<argon2 hash>");
            i += rest.bytes().take_while(is_phc).count();
        } else if let Some(after) = rest.strip_prefix("kg_") {
            let id = after.bytes().take_while(is_id).count();
            if id > 0 && after.as_bytes().get(id) == Some(&b'_') {
                let secret = after[id + 1..]
                    .bytes()
                    .take_while(u8::is_ascii_alphanumeric)
                    .count();
                out.push_str(&rest[..4 + id]);
                if secret > 0 {
                    out.push_str("<redacted>");
                }
                i += 4 + id + secret;
            } else {
                out.push_str("kg_");
                i += 3;
            }
        } else {
            let c = rest.chars().next().unwrap_or_default();
            out.push(c);
            i += c.len_utf8();
        }
    }
    out
}

/// Everything keygate needs to serve, validated. Immutable once built.
pub struct Snapshot {
    pub server: ServerSettings,
    pub tls: Arc<rustls::ServerConfig>,
    /// `[tls] client_ca`, for re-checking the client certificates of connections opened under
    /// an earlier snapshot (`pipeline::gate`).
    pub client_auth: Option<crate::tls::ClientAuth>,
    /// [`crate::tls::cert_digest`] of the `[tls] cert` file served (zero for the demo's
    /// in-memory certificate).
    pub cert_digest: [u8; 32],
    /// The leaf certificate's expiry (unix seconds), when it could be read.
    pub cert_not_after: Option<i64>,
    pub upstream: Upstream,
    /// Upgrade policy and `Host` choice for what the upstream receives.
    pub forwarding: crate::proto::ForwardRules,
    pub auth: AuthSettings,
    pub access: AccessRules,
    pub keys: HashMap<Box<str>, Arc<Key>>,
    pub log: LogSettings,
    pub admin: Option<SocketAddr>,
    pub state: Option<StateSettings>,
    /// `[quota_costs]`.
    pub quota_costs: crate::quota::CostTable,
    /// `[key_networks]`.
    pub key_networks: crate::networks::NetworkPolicy,
    /// `[introspection]`: the path keygate answers itself, or `None` when turned off.
    pub introspection_path: Option<String>,
    /// The upstream URL as configured (for the exposure check; holds no credentials).
    pub upstream_url: String,
    /// `[[webhooks]]`: signed routes that need no API key.
    pub webhooks: crate::webhook::Routes,
    pub caps: Caps,
    /// Non-fatal findings (weak argon2 parameters, …) for `check` and the start-up log.
    pub warnings: Vec<String>,
    /// `[cluster]`, when this instance shares state through Redis (restart-only).
    pub cluster: Option<crate::cluster::ClusterSettings>,
    /// Digest of the config file's canonical form (`keygate_config_info`), for drift alerts.
    pub config_hash: String,
}

pub struct ServerSettings {
    pub listen: SocketAddr,
    pub workers: Option<usize>,
    pub max_body_bytes: u64,
    pub max_header_bytes: usize,
    pub header_read_timeout: Duration,
    /// Longest a client may leave keygate waiting for the next request-body byte (408 after).
    pub body_read_timeout: Duration,
    pub tls_handshake_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_connections: usize,
    pub shutdown_grace: Duration,
    pub h2_max_concurrent_streams: u32,
    pub hsts: Option<HeaderValue>,
    /// Expect a PROXY protocol v1/v2 header first on every connection (from trusted proxies).
    pub proxy_protocol: bool,
}

/// Caps on connections, buffered bodies, upstream connections and per-key concurrency
/// (`config/build/caps.rs` has the TOML names and defaults).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caps {
    /// Client connections one address (IPv4 /32, IPv6 /64) may hold.
    pub max_connections_per_ip: usize,
    /// Request bodies up to this size are read completely before the upstream is contacted;
    /// 0: every body streams.
    pub request_buffer_bytes: usize,
    /// A body being buffered must arrive within this (else 408).
    pub request_buffer_timeout: Duration,
    /// Requests using an upstream connection at once.
    pub upstream_max_connections: usize,
    /// How long a request waits for an upstream connection (else 503).
    pub upstream_queue_timeout: Duration,
    /// Requests one key may have in flight unless its `max_concurrent` says otherwise.
    pub default_max_concurrent: u32,
    /// `server.send_timeout`: a response the client takes nothing of for this long is aborted
    /// (HTTP/1.1: connection closed; HTTP/2: stream reset), see `stall.rs`.
    pub send_timeout: Duration,
    /// `upstream.tunnel_idle_timeout`: an upgraded connection (WebSocket) that carries no byte
    /// either way for this long is closed, see `tunnel::splice`.
    pub tunnel_idle_timeout: Duration,
}

pub struct AuthSettings {
    pub header: HeaderName,
    pub identity_header: HeaderName,
    pub failed_auth: Arc<FailedAuthThrottle>,
    pub verify_concurrency: usize,
    /// `cors_preflight = "forward"`: CORS preflights go to the upstream without a key, within
    /// this per-client budget (`src/cors.rs`); `None`: they need a key like any request.
    pub cors_preflight: Option<Arc<crate::cors::PreflightBudget>>,
}

pub struct LogSettings {
    pub json: bool,
    pub level: tracing::Level,
    /// Lower-cased parameter names whose values are replaced with `REDACTED` (built-ins included).
    pub redact_query_params: Vec<String>,
    /// Lines of each kind a client can cause per window (`client_event_limit`, default
    /// `"10/min"`); see `log::Budget`.
    pub client_event_limit: crate::limits::Rate,
}

pub struct StateSettings {
    pub path: PathBuf,
    pub rotation_period: Duration,
}

#[cfg(test)]
mod tests {
    use super::*;

    const HASH: &str = "$argon2id$v=19$m=19456,t=2,p=1$6T7zPc3amVFwVrfBQwII4g$yBncQ5qQWqiVb7sKhMn53BxW688GdmS5toDWReukc9I";
    const TOKEN: &str = "kg_demo_0123456789ABCDEFGHIJKLMNOPQRSTUV0qxrDd";

    fn errors_of(toml: &str) -> String {
        let ck = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        let ctx = BuildContext {
            tls_override: Some(TlsSource::Pem {
                cert: ck.cert.pem().into_bytes(),
                key: ck.signing_key.serialize_pem().into_bytes(),
            }),
            ..Default::default()
        };
        match raw_from_str(toml) {
            Ok(raw) => build(raw, &ctx)
                .err()
                .expect("config has errors")
                .to_string(),
            Err(e) => e.to_string(),
        }
    }

    /// Regression from the `config` fuzz target: a hash or token in the wrong field was quoted
    /// back in the error.
    #[test]
    fn errors_never_quote_hashes_or_tokens() {
        let swapped = errors_of(&format!("[[keys]]\nid = \"{HASH}\"\nhash = \"demo\"\n"));
        assert!(swapped.contains("keys[0].id: invalid key id"), "{swapped}");
        assert!(swapped.contains(crate::auth::PHC_FORMAT_HINT), "{swapped}");
        assert!(!swapped.contains("rpOzTdKt"), "{swapped}");

        let token_as_id = errors_of(&format!("[[keys]]\nid = \"{TOKEN}\"\nhash = \"{HASH}\"\n"));
        assert!(
            token_as_id.contains("keys[0].id: invalid key id"),
            "{token_as_id}"
        );
        assert!(!token_as_id.contains("0123456789"), "{token_as_id}");

        let wrong_type = errors_of(&format!("[server]\nworkers = \"{HASH}\"\n"));
        assert!(wrong_type.starts_with("server.workers:"), "{wrong_type}");
        assert!(!wrong_type.contains("$argon2id$"), "{wrong_type}");

        let truncated = errors_of("[access]\nallow = [\"$argon2id$v=19cLGidnkrA\"]\n");
        assert!(!truncated.contains("cLGidnkrA"), "{truncated}");
    }

    /// A prefix no request could be inside under every path reading is refused, not ignored.
    #[test]
    fn scope_prefixes_with_path_parameters_are_refused() {
        let errs = errors_of(&format!(
            "[[keys]]\nid = \"a\"\nhash = \"{HASH}\"\npaths = [\"/ok/\", \"/v1;x/\"]\n"
        ));
        assert!(
            errs.contains(
                "keys[0].paths[1] (id \"a\"): path prefix \"/v1;x/\" must not contain ';'"
            ),
            "{errs}"
        );
        assert!(!errs.contains("paths[0]"), "{errs}");
    }

    #[test]
    fn scrubbing_leaves_ordinary_text_alone() {
        for plain in [
            "invalid CIDR \"10.0.0.300/8\"",
            "kg_",
            "kg_demo",
            "a $ sign",
            "é kg_x",
        ] {
            assert_eq!(scrub_secrets(plain), plain);
        }
        assert_eq!(scrub_secrets("x kg_a-1_Zz9 y"), "x kg_a-1_<redacted> y");
        assert_eq!(scrub_secrets("\"$argon2i$v=19$m=8\""), "\"<argon2 hash>\"");
    }
}
