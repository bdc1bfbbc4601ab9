//! `[upstream] host` and `[upstream] upgrade_protocols`: what the upstream receives.

use super::Errors;
use crate::config::raw::RawUpstream;
use crate::proto::{self, ForwardRules, HostMode};

/// Validates the forwarding rules; every problem goes to `errs` with its TOML path.
pub(super) fn rules(u: &RawUpstream, errs: &mut Errors) -> ForwardRules {
    let mut rules = ForwardRules::default();
    match u.host.as_deref() {
        None | Some("client") => {}
        Some("upstream") => rules.host = HostMode::Upstream,
        Some(other) => errs.push(
            "upstream.host",
            format!("must be \"client\" or \"upstream\", not {other:?}"),
        ),
    }
    if let Some(list) = &u.upgrade_protocols {
        rules.upgrade_protocols.clear();
        for (i, p) in list.iter().enumerate() {
            let path = format!("upstream.upgrade_protocols[{i}]");
            if !proto::is_token(p) || p.len() > proto::MAX_LOGGED_PROTOCOL {
                errs.push(
                    path,
                    format!(
                        "{:?} is not a protocol name (a token of at most {} characters, e.g. \"websocket\")",
                        p.chars().take(40).collect::<String>(),
                        proto::MAX_LOGGED_PROTOCOL
                    ),
                );
            } else if proto::carries_http(p) {
                errs.push(
                    path,
                    format!(
                        "{p:?} would tunnel HTTP past every check (scopes, keys, rate limits, logs); it is never forwarded"
                    ),
                );
            } else {
                rules.upgrade_protocols.push(p.to_ascii_lowercase().into());
            }
        }
    }
    rules
}
