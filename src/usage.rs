//! The state file (`[state] path`): when each key was last used and from where, its quota
//! usage in the current window (`quota.rs`) and the networks it was used from (`networks.rs`).
//! Kept in memory, written atomically (temp file, fsync, rename) behind the requests: at most
//! every [`SAVE_EVERY`] when something changed, and at shutdown (SIGTERM/SIGINT); read back at
//! start-up and by `keygate keys`. A reload (SIGHUP) does not touch it: the counters live
//! beside the config snapshot, not in it.
//!
//! What a crash (SIGKILL, power loss) can lose: the changes of the last [`SAVE_EVERY`] at most.
//! For a quota that means up to 5 seconds of counted requests are forgotten, so a key can get
//! that much more than its quota once per crash; never less.

use std::collections::{BTreeMap, HashMap};
use std::io::Write as _;
use std::net::IpAddr;
use std::path::Path;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct KeyUsage {
    /// Unix seconds.
    pub last_used: i64,
    pub last_ip: String,
}

/// How often changed state is written (the most a crash can lose).
pub const SAVE_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

/// The state file. Version 1 had `keys` only; the other fields default to empty.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct StateFile {
    pub version: u32,
    pub keys: BTreeMap<String, KeyUsage>,
    /// Quota counters of the current windows, by key id.
    #[serde(default)]
    pub quotas: BTreeMap<String, crate::quota::QuotaRecord>,
    /// Client networks per key id.
    #[serde(default)]
    pub networks: BTreeMap<String, Vec<crate::networks::NetworkRecord>>,
}

/// Everything the state file holds, live.
#[derive(Default)]
pub struct State {
    pub usage: Usage,
    pub quotas: crate::quota::QuotaStore,
    pub networks: crate::networks::NetworkStore,
    /// One writer at a time (the periodic save and the one at shutdown share a temp file).
    saving: Mutex<()>,
}

impl State {
    /// Seeds from a state file; a missing file is an empty state, a corrupt one is reported.
    /// Keys known from a version-1 file (last use only) get their last network as history, so
    /// an upgrade does not log `key_first_use` for keys in use.
    pub fn load(path: &Path, policy: &crate::networks::NetworkPolicy) -> Result<Self, String> {
        let file = read_state(path)?;
        let state = State::default();
        {
            let mut e = state
                .usage
                .entries
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            for (id, u) in &file.keys {
                if let Ok(ip) = u.last_ip.parse() {
                    e.insert(id.as_str().into(), (u.last_used, ip));
                }
            }
        }
        if let Some(q) = state.quotas.local() {
            q.import(file.quotas);
        }
        if let Some(n) = state.networks.local() {
            let mut networks = file.networks;
            for (id, u) in &file.keys {
                if networks.contains_key(id) {
                    continue;
                }
                if let Ok(ip) = u.last_ip.parse::<IpAddr>() {
                    let len = if ip.to_canonical().is_ipv4() {
                        policy.ipv4_prefix
                    } else {
                        policy.ipv6_prefix
                    };
                    if let Ok(net) = ipnet::IpNet::new(ip.to_canonical(), len) {
                        networks.insert(
                            id.clone(),
                            vec![crate::networks::NetworkRecord {
                                net: net.trunc().to_string(),
                                last_seen: u.last_used,
                            }],
                        );
                    }
                }
            }
            n.import(networks);
        }
        Ok(state)
    }

    /// Writes the state file if anything changed since the last save (or `force`). A failed
    /// write leaves the state dirty, so the next save tries again.
    pub fn save(
        &self,
        path: &Path,
        force: bool,
        policy: &crate::networks::NetworkPolicy,
    ) -> std::io::Result<()> {
        let _one_writer = self.saving.lock().unwrap_or_else(|p| p.into_inner());
        let quotas = self.quotas.local();
        let networks = self.networks.local();
        let mut dirty = self.usage.dirty.swap(false, Relaxed);
        dirty |= quotas.is_some_and(|q| q.take_dirty());
        dirty |= networks.is_some_and(|n| n.take_dirty());
        if !force && !dirty {
            return Ok(());
        }
        let now = crate::clock::now();
        let file = StateFile {
            version: 2,
            keys: self.usage.export(),
            quotas: quotas.map(|q| q.export(now)).unwrap_or_default(),
            networks: networks.map(|n| n.export(now, policy)).unwrap_or_default(),
        };
        write_atomically(path, &file).inspect_err(|_| {
            self.usage.dirty.store(true, Relaxed);
            if let Some(q) = quotas {
                q.mark_dirty();
            }
            if let Some(n) = networks {
                n.mark_dirty();
            }
        })
    }
}

#[derive(Default)]
pub struct Usage {
    entries: Mutex<HashMap<Box<str>, (i64, IpAddr)>>,
    dirty: AtomicBool,
}

impl Usage {
    /// Called on every authenticated request: one uncontended lock, no allocation after the
    /// key's first use. Returns whether anything changed (a new second or client address),
    /// so cluster mode notes the use for Redis at most that often.
    pub fn touch(&self, id: &str, ip: IpAddr, now: i64) -> bool {
        let mut e = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        match e.get_mut(id) {
            Some(slot) => {
                if slot.0 == now && slot.1 == ip {
                    return false;
                }
                *slot = (now, ip);
            }
            None => {
                e.insert(id.into(), (now, ip));
            }
        }
        self.dirty.store(true, Relaxed);
        true
    }

    pub fn get(&self, id: &str) -> Option<KeyUsage> {
        let e = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        e.get(id).map(|(t, ip)| KeyUsage {
            last_used: *t,
            last_ip: ip.to_string(),
        })
    }

    fn export(&self) -> BTreeMap<String, KeyUsage> {
        let e = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        e.iter()
            .map(|(id, (t, ip))| {
                (
                    id.to_string(),
                    KeyUsage {
                        last_used: *t,
                        last_ip: ip.to_string(),
                    },
                )
            })
            .collect()
    }
}

/// The state file can be written where `path` says: its directory exists and a file can be
/// created and removed in it (as [`write_atomically`] does: a temporary file, then a rename).
/// Checked by `keygate check` and at start-up, so that a missing or read-only directory is an
/// error naming `state.path` rather than a warning every few seconds while usage, quotas and
/// network history silently go unsaved (fresh user T5-9: a `3/day` quota started again from
/// zero at every restart).
pub fn check_state_dir(path: &Path) -> Result<(), String> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    if !dir.is_dir() {
        return Err(format!(
            "the directory {} does not exist (create it for the user keygate runs as; the \
             systemd unit's StateDirectory= creates /var/lib/keygate)",
            dir.display()
        ));
    }
    let probe = dir.join(format!(".keygate-check.{}", std::process::id()));
    std::fs::File::create(&probe)
        .and_then(|_| std::fs::remove_file(&probe))
        .map_err(|e| {
            let _ = std::fs::remove_file(&probe);
            format!(
                "cannot write the state file's directory {}: {e}",
                dir.display()
            )
        })
}

fn write_atomically(path: &Path, file: &StateFile) -> std::io::Result<()> {
    let text = serde_json::to_string_pretty(file).map_err(std::io::Error::other)?;
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".{}.tmp{}",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("state"),
        std::process::id()
    ));
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })?;
    // Make the rename itself durable (best effort: not every file system allows it).
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// Reads a state file. Missing file: empty.
pub fn read_state(path: &Path) -> Result<StateFile, String> {
    match std::fs::read_to_string(path) {
        Ok(text) => serde_json::from_str::<StateFile>(&text)
            .map_err(|e| format!("state file {} is not valid: {e}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(StateFile::default()),
        Err(e) => Err(format!("cannot read state file {}: {e}", path.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::networks::NetworkPolicy;

    #[test]
    fn save_and_load_roundtrip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        let p = NetworkPolicy::default();
        let s = State::default();
        s.usage
            .touch("alpha", "192.0.2.7".parse().unwrap(), crate::clock::now());
        let q = crate::quota::parse_quota("10/day").unwrap();
        let now = crate::clock::now();
        s.quotas.local().unwrap().charge("alpha", q, 3, now);
        s.save(&path, false, &p).unwrap();
        let back = State::load(&path, &p).unwrap();
        let got = back.usage.get("alpha").unwrap();
        assert_eq!(got.last_ip, "192.0.2.7");
        assert!(got.last_used > 1_700_000_000);
        assert_eq!(back.quotas.local().unwrap().used("alpha", q, now), 3);
        assert!(
            State::load(&dir.path().join("missing.json"), &p)
                .unwrap()
                .usage
                .get("alpha")
                .is_none()
        );
        std::fs::write(&path, "{not json").unwrap();
        assert!(State::load(&path, &p).is_err());
    }

    #[test]
    fn version_1_files_seed_the_network_history() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        std::fs::write(
            &path,
            r#"{"version":1,"keys":{"alpha":{"last_used":1800000000,"last_ip":"192.0.2.7"}}}"#,
        )
        .unwrap();
        let p = NetworkPolicy::default();
        let s = State::load(&path, &p).unwrap();
        let n = s.networks.local().unwrap();
        assert_eq!(
            n.observe("alpha", "192.0.2.99".parse().unwrap(), 1_800_000_100, &p),
            crate::networks::Sighting::Known
        );
    }

    #[test]
    fn a_failed_save_is_retried() {
        let dir = tempfile::tempdir().unwrap();
        let p = NetworkPolicy::default();
        let s = State::default();
        s.usage
            .touch("alpha", "192.0.2.7".parse().unwrap(), crate::clock::now());
        let nowhere = dir.path().join("missing-dir").join("state.json");
        assert!(s.save(&nowhere, false, &p).is_err());
        let path = dir.path().join("state.json");
        s.save(&path, false, &p).unwrap();
        assert!(State::load(&path, &p).unwrap().usage.get("alpha").is_some());
        // Nothing new since: no write.
        std::fs::remove_file(&path).unwrap();
        s.save(&path, false, &p).unwrap();
        assert!(!path.exists());
    }
}
