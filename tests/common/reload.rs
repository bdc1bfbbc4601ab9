//! SIGHUP reloads of a running keygate: write the new config, signal, wait for the outcome.

use super::{Keygate, eventually};

/// The `config_reloaded` and `config_reload_failed` events so far, in order.
pub fn reload_events(kg: &Keygate) -> Vec<serde_json::Value> {
    kg.json_logs()
        .into_iter()
        .filter(|v| v["event"] == "config_reloaded" || v["event"] == "config_reload_failed")
        .collect()
}

/// Writes `config` over the running config file, sends SIGHUP and waits for the outcome:
/// the `config_reloaded` or `config_reload_failed` event.
pub async fn reload_with(kg: &Keygate, config: &str) -> serde_json::Value {
    std::fs::write(&kg.config, config).unwrap();
    reload(kg).await
}

/// Sends SIGHUP and waits for the outcome event.
pub async fn reload(kg: &Keygate) -> serde_json::Value {
    let before = reload_events(kg).len();
    kg.signal("HUP");
    eventually("reload outcome", kg, || {
        reload_events(kg).get(before).cloned()
    })
    .await
}
