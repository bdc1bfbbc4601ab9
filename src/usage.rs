//! When each key was last used, and from where: kept in memory, written atomically to
//! `[state] path` (write to a temp file, fsync, rename) every minute and at shutdown, and read
//! back at start-up and by `keygate keys`.

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

#[derive(Debug, Default, Serialize, Deserialize)]
struct StateFile {
    version: u32,
    keys: BTreeMap<String, KeyUsage>,
}

#[derive(Default)]
pub struct Usage {
    entries: Mutex<HashMap<Box<str>, (i64, IpAddr)>>,
    dirty: AtomicBool,
}

impl Usage {
    /// Seeds from a state file; a missing file is an empty state, a corrupt one is reported.
    pub fn load(path: &Path) -> Result<Self, String> {
        let usage = Usage::default();
        let map = read_state(path)?;
        let mut e = usage.entries.lock().unwrap_or_else(|p| p.into_inner());
        for (id, u) in map {
            if let Ok(ip) = u.last_ip.parse() {
                e.insert(id.into_boxed_str(), (u.last_used, ip));
            }
        }
        drop(e);
        Ok(usage)
    }

    /// Called on every authenticated request: one uncontended lock, no allocation after the
    /// key's first use.
    pub fn touch(&self, id: &str, ip: IpAddr) {
        let now = jiff::Timestamp::now().as_second();
        let mut e = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        match e.get_mut(id) {
            Some(slot) => {
                if slot.0 == now && slot.1 == ip {
                    return;
                }
                *slot = (now, ip);
            }
            None => {
                e.insert(id.into(), (now, ip));
            }
        }
        self.dirty.store(true, Relaxed);
    }

    pub fn get(&self, id: &str) -> Option<KeyUsage> {
        let e = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        e.get(id).map(|(t, ip)| KeyUsage {
            last_used: *t,
            last_ip: ip.to_string(),
        })
    }

    /// Writes the state file if anything changed since the last save (or `force`). A failed
    /// write leaves the state dirty, so the next periodic save tries again.
    pub fn save(&self, path: &Path, force: bool) -> std::io::Result<()> {
        let was_dirty = self.dirty.swap(false, Relaxed);
        if !force && !was_dirty {
            return Ok(());
        }
        self.write(path)
            .inspect_err(|_| self.dirty.store(true, Relaxed))
    }

    fn write(&self, path: &Path) -> std::io::Result<()> {
        let keys: BTreeMap<String, KeyUsage> = {
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
        };
        let text = serde_json::to_string_pretty(&StateFile { version: 1, keys })
            .map_err(std::io::Error::other)?;
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
}

/// Reads a state file into id → usage. Missing file: empty.
pub fn read_state(path: &Path) -> Result<BTreeMap<String, KeyUsage>, String> {
    match std::fs::read_to_string(path) {
        Ok(text) => serde_json::from_str::<StateFile>(&text)
            .map(|s| s.keys)
            .map_err(|e| format!("state file {} is not valid: {e}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(BTreeMap::new()),
        Err(e) => Err(format!("cannot read state file {}: {e}", path.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn save_and_load_roundtrip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        let u = Usage::default();
        u.touch("alpha", "192.0.2.7".parse().unwrap());
        u.save(&path, false).unwrap();
        let back = Usage::load(&path).unwrap();
        let got = back.get("alpha").unwrap();
        assert_eq!(got.last_ip, "192.0.2.7");
        assert!(got.last_used > 1_700_000_000);
        assert!(
            Usage::load(&dir.path().join("missing.json"))
                .unwrap()
                .get("alpha")
                .is_none()
        );
        std::fs::write(&path, "{not json").unwrap();
        assert!(Usage::load(&path).is_err());
    }

    #[test]
    fn a_failed_save_is_retried() {
        let dir = tempfile::tempdir().unwrap();
        let u = Usage::default();
        u.touch("alpha", "192.0.2.7".parse().unwrap());
        let nowhere = dir.path().join("missing-dir").join("state.json");
        assert!(u.save(&nowhere, false).is_err());
        let path = dir.path().join("state.json");
        u.save(&path, false).unwrap();
        assert!(Usage::load(&path).unwrap().get("alpha").is_some());
        // Nothing new since: no write.
        std::fs::remove_file(&path).unwrap();
        u.save(&path, false).unwrap();
        assert!(!path.exists());
    }
}
