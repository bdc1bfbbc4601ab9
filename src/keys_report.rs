//! `keygate keys`: the operator's view of configured keys.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use crate::config::Snapshot;
use crate::usage::StateFile;

const UNUSED_WARN_DAYS: i64 = 90;
const EXPIRY_WARN_DAYS: i64 = 14;

/// One line per key. `rotation` is `[state] rotation_period` (default 90 days), used for keys
/// whose own or role's `rotation_period` is unset. NETWORKS counts the client networks in the
/// key's history (`[key_networks]`); QUOTA is the use in the current window.
pub fn render(
    snap: &Snapshot,
    state: &StateFile,
    rotation: Duration,
    now: jiff::Timestamp,
    note: &str,
) -> String {
    let usage = &state.keys;
    let networks = networks_in_history(snap, state, now);
    let mut ids: Vec<&str> = snap.keys.keys().map(|k| &**k).collect();
    ids.sort_unstable();
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<24} {:<12} {:<22} {:<18} {:<8} {:<18} {:<26} WARNINGS",
        "ID", "ROLE", "STATUS", "EXPIRES", "NETWORKS", "QUOTA", "LAST USED"
    );
    let day = 86_400;
    for id in ids {
        let key = &snap.keys[id];
        let status = if key.disabled {
            "disabled".to_string()
        } else if key.is_expired(now) {
            "expired".to_string()
        } else if let Some(e) = key.expires {
            format!("expires in {}", time_left(e.as_second() - now.as_second()))
        } else {
            "active".to_string()
        };
        let expires = key.expires.map_or("never".to_string(), |e| {
            e.strftime("%Y-%m-%d %H:%M").to_string()
        });
        let mut warnings = Vec::new();
        let last = usage.get(id);
        let last_text = match last {
            Some(u) => {
                let ts = jiff::Timestamp::from_second(u.last_used).map_or("?".to_string(), |t| {
                    t.strftime("%Y-%m-%d %H:%M").to_string()
                });
                if now.as_second() - u.last_used > UNUSED_WARN_DAYS * day {
                    warnings.push(format!(
                        "unused for {} days",
                        (now.as_second() - u.last_used) / day
                    ));
                }
                format!("{ts} from {}", u.last_ip)
            }
            None => {
                if let Some(c) = key.created
                    && now.as_second() - c.as_second() > UNUSED_WARN_DAYS * day
                {
                    warnings.push("never used, created over 90 days ago".to_string());
                }
                "never".to_string()
            }
        };
        let rotation = key.rotation_period.unwrap_or(rotation);
        if let Some(c) = key.created {
            let age = now.as_second() - c.as_second();
            if age > rotation.as_secs() as i64 {
                warnings.push(format!(
                    "older than the rotation period ({} days old)",
                    age / day
                ));
            }
        } else {
            warnings.push("no `created` date; age unknown".to_string());
        }
        if let Some(e) = key.expires {
            let left = e.as_second() - now.as_second();
            if left > 0 && left < EXPIRY_WARN_DAYS * day {
                warnings.push(format!("expires within {EXPIRY_WARN_DAYS} days"));
            }
        }
        let role = key.role.as_deref().unwrap_or("-");
        let nets = networks.get(id).copied().unwrap_or(0);
        let quota = match key.quota {
            Some(q) => {
                let (start, _) = crate::quota::window(q.period, crate::clock::now());
                let used = state
                    .quotas
                    .get(id)
                    .filter(|r| r.period == q.period && r.window_start == start)
                    .map_or(0, |r| r.used);
                format!("{used}/{}/{}", q.limit, q.period.as_str())
            }
            None => "-".to_string(),
        };
        let _ = writeln!(
            out,
            "{id:<24} {role:<12} {status:<22} {expires:<18} {nets:<8} {quota:<18} {last_text:<26} {}",
            warnings.join("; ")
        );
    }
    out.push_str(note);
    out
}

/// Networks per key id within `[key_networks] remember` of `now`.
fn networks_in_history(
    snap: &Snapshot,
    state: &StateFile,
    now: jiff::Timestamp,
) -> BTreeMap<String, usize> {
    let horizon = now.as_second() - snap.key_networks.remember_secs;
    state
        .networks
        .iter()
        .map(|(id, list)| {
            (
                id.clone(),
                list.iter().filter(|r| r.last_seen >= horizon).count(),
            )
        })
        .collect()
}

/// Printed under the table: a running keygate writes the state file behind the requests (at
/// most every 5 seconds, and at stop), so the file read here can lag behind a little.
pub const FRESHNESS_NOTE: &str = "LAST USED, NETWORKS and QUOTA come from the state file, which a running keygate writes every 5 seconds when something changed and at stop: they may be a few seconds old.\n";

/// Printed under the table when the figures are the cluster's (`[cluster]`, Redis answered).
pub const CLUSTER_NOTE: &str = "LAST USED, NETWORKS and QUOTA are the cluster's, read from Redis (every instance writes its uses there at most 2 seconds behind), merged with this host's state file.\n";
/// [`CLUSTER_NOTE`] for a config without a `[state] path`: there is no state file to merge.
pub const CLUSTER_NOTE_NO_STATE: &str = "LAST USED, NETWORKS and QUOTA are the cluster's, read from Redis (every instance writes its uses there at most 2 seconds behind); this config has no [state] path, so there is no local state file.\n";

/// Folds the cluster's figures (`keys[i]` ↔ `shared[i]`) into `state` read from this host's
/// state file: the later last use of the two, the cluster's network history (bounded as in
/// Redis; this host's own list only for keys Redis has none for), and the cluster's quota counter (the state file holds only what this instance
/// counted while Redis was unavailable).
pub fn merge_cluster(
    state: &mut StateFile,
    snap: &Snapshot,
    keys: &[(&str, Option<i64>)],
    shared: Vec<crate::cluster::history::SharedUsage>,
) {
    for ((id, window), s) in keys.iter().zip(shared) {
        if let Some((t, ip)) = s.last_used {
            let later = state.keys.get(*id).is_none_or(|u| u.last_used < t);
            if later {
                state.keys.insert(
                    id.to_string(),
                    crate::usage::KeyUsage {
                        last_used: t,
                        last_ip: ip,
                    },
                );
            }
        }
        if let (Some(used), Some(start), Some(q)) = (
            s.quota_used,
            window,
            snap.keys.get(*id).and_then(|k| k.quota),
        ) {
            state.quotas.insert(
                id.to_string(),
                crate::quota::QuotaRecord {
                    period: q.period,
                    window_start: *start,
                    used,
                    exceeded_logged: false,
                    window_end: 0,
                },
            );
        }
        if !s.networks.is_empty() {
            state.networks.insert(
                id.to_string(),
                s.networks
                    .into_iter()
                    .map(|(net, last_seen)| crate::networks::NetworkRecord { net, last_seen })
                    .collect(),
            );
        }
    }
}

/// `secs` (> 0) as "N days" from a day on, "N hours" below it, "N minutes" below an hour.
fn time_left(secs: i64) -> String {
    let plural = |n: i64, unit: &str| format!("{n} {unit}{}", if n == 1 { "" } else { "s" });
    match secs {
        s if s >= 86_400 => plural(s / 86_400, "day"),
        s if s >= 3_600 => plural(s / 3_600, "hour"),
        s => plural((s / 60).max(1), "minute"),
    }
}

#[cfg(test)]
mod tests {
    use super::time_left;

    #[test]
    fn below_a_day_in_hours_below_an_hour_in_minutes() {
        assert_eq!(time_left(3 * 86_400 + 5), "3 days");
        assert_eq!(time_left(86_400), "1 day");
        assert_eq!(time_left(86_399), "23 hours");
        assert_eq!(time_left(3_600), "1 hour");
        assert_eq!(time_left(3_599), "59 minutes");
        assert_eq!(time_left(20), "1 minute");
    }
}
