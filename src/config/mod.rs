//! Configuration: the raw TOML file (`raw`) and the validated runtime [`Snapshot`] (`build`).
//!
//! A snapshot is built once, completely, off to the side, and then shared read-only behind an
//! `Arc`. Hot paths never parse anything; a reload builds a new snapshot and swaps it in.

mod build;
pub mod raw;

pub use build::{
    BUILTIN_REDACTED_PARAMS, BuildContext, TlsSource, build, load_file, parse_duration, parse_rate,
    parse_str as raw_from_str,
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
        ConfigErrors(vec![ConfigError {
            path: path.into(),
            message: message.into(),
        }])
    }
}

/// Everything keygate needs to serve, validated. Immutable once built.
pub struct Snapshot {
    pub server: ServerSettings,
    pub tls: Arc<rustls::ServerConfig>,
    /// The leaf certificate's expiry (unix seconds), when it could be read.
    pub cert_not_after: Option<i64>,
    pub upstream: Upstream,
    pub auth: AuthSettings,
    pub access: AccessRules,
    pub keys: HashMap<Box<str>, Arc<Key>>,
    pub log: LogSettings,
    pub admin: Option<SocketAddr>,
    pub state: Option<StateSettings>,
    /// Non-fatal findings (weak argon2 parameters, …) for `check` and the start-up log.
    pub warnings: Vec<String>,
}

pub struct ServerSettings {
    pub listen: SocketAddr,
    pub workers: Option<usize>,
    pub max_body_bytes: u64,
    pub max_header_bytes: usize,
    pub header_read_timeout: Duration,
    pub tls_handshake_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_connections: usize,
    pub shutdown_grace: Duration,
    pub h2_max_concurrent_streams: u32,
    pub hsts: Option<HeaderValue>,
}

pub struct AuthSettings {
    pub header: HeaderName,
    pub identity_header: HeaderName,
    pub failed_auth: Arc<FailedAuthThrottle>,
    pub verify_concurrency: usize,
}

pub struct LogSettings {
    pub json: bool,
    pub level: tracing::Level,
    /// Lower-cased parameter names whose values are replaced with `REDACTED` (built-ins included).
    pub redact_query_params: Vec<String>,
}

pub struct StateSettings {
    pub path: PathBuf,
    pub rotation_period: Duration,
}
