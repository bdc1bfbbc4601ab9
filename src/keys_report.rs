//! `keygate keys`: the operator's view of configured keys.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use crate::config::Snapshot;
use crate::usage::KeyUsage;

const UNUSED_WARN_DAYS: i64 = 90;
const EXPIRY_WARN_DAYS: i64 = 14;

pub fn render(
    snap: &Snapshot,
    usage: &BTreeMap<String, KeyUsage>,
    rotation: Duration,
    now: jiff::Timestamp,
) -> String {
    let mut ids: Vec<&str> = snap.keys.keys().map(|k| &**k).collect();
    ids.sort_unstable();
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<24} {:<22} {:<22} {:<26} WARNINGS",
        "ID", "STATUS", "EXPIRES", "LAST USED"
    );
    let day = 86_400;
    for id in ids {
        let key = &snap.keys[id];
        let status = if key.disabled {
            "disabled".to_string()
        } else if key.is_expired(now) {
            "expired".to_string()
        } else if let Some(e) = key.expires {
            format!(
                "expires in {} days",
                (e.as_second() - now.as_second()) / day
            )
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
                if let Some(c) = key.created {
                    if now.as_second() - c.as_second() > UNUSED_WARN_DAYS * day {
                        warnings.push("never used, created over 90 days ago".to_string());
                    }
                }
                "never".to_string()
            }
        };
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
        let _ = writeln!(
            out,
            "{id:<24} {status:<22} {expires:<22} {last_text:<26} {}",
            warnings.join("; ")
        );
    }
    out
}
