//! keygate: an authenticating TLS reverse proxy.
//!
//! A request's path through the code, top to bottom:
//! [`server`] (accept, IP gate, TLS, HTTP) → [`pipeline`] (request id, credential, key status,
//! key IP, scope, rate limit) → [`forward`] (upstream) → [`body`] (streaming, access log).
//! Configuration is parsed once into an immutable [`config::Snapshot`] and swapped on reload.

pub mod access;
pub mod admin;
pub mod auth;
pub mod body;
pub mod buffer_budget;
pub mod cli;
pub mod clock;
pub mod cluster;
pub mod config;
pub mod conn_limits;
pub mod cors;
pub mod echo;
pub mod exposure;
pub mod forward;
pub mod introspection;
pub mod keys_report;
pub mod limits;
pub mod log;
pub mod metrics;
pub mod networks;
pub mod pipeline;
pub mod proto;
pub mod proxy_protocol;
pub mod quota;
pub mod reject;
pub mod server;
pub mod side_runtime;
pub mod stall;
pub mod tls;
pub mod tunnel;
pub mod upstream_cap;
pub mod usage;
pub mod webhook;
