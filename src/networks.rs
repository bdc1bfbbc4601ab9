//! New-network detection per key (SPEC §9): each key remembers the client networks it was used
//! from (IPv4 /24 and IPv6 /64 by default) over the last N days (default 30). An authenticated
//! request from a network outside that history logs `key_new_network`; a key's very first use
//! logs `key_first_use` instead. A leaked key used from somewhere new shows up in the log and in
//! `keygate_key_new_network_total`.
//!
//! Hot path: one hash lookup (read lock), one uncontended per-key mutex, a scan of at most
//! `max_per_key` 17-byte entries, and no allocation unless the network is new. `last_seen` is
//! refreshed at most once an hour per network, so steady traffic does not dirty the state file.
//!
//! The history lives in a [`NetworkStore`]. In cluster mode this instance's history is the first
//! filter: only a network new to it asks the cluster's history in Redis (`cluster/history.rs`).

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Mutex, RwLock};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

/// `[key_networks]`, validated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NetworkPolicy {
    pub ipv4_prefix: u8,
    pub ipv6_prefix: u8,
    /// Networks not seen for this many seconds are forgotten.
    pub remember_secs: i64,
    /// At most this many networks per key; the least recently seen is forgotten first.
    pub max_per_key: usize,
}

impl Default for NetworkPolicy {
    fn default() -> Self {
        NetworkPolicy {
            ipv4_prefix: 24,
            ipv6_prefix: 64,
            remember_secs: 30 * 86_400,
            max_per_key: 64,
        }
    }
}

impl NetworkPolicy {
    /// The client's network as a CIDR (`192.0.2.0/24`, `2001:db8::/64` by default), as the
    /// state file and Redis (cluster mode) store it.
    pub fn network(&self, ip: IpAddr) -> IpNet {
        let ip = ip.to_canonical();
        let len = if ip.is_ipv4() {
            self.ipv4_prefix
        } else {
            self.ipv6_prefix
        };
        IpNet::new(ip, len).map_or(IpNet::from(ip), |n| n.trunc())
    }

    /// The client's network as (address bits as IPv6, prefix length in IPv6 terms).
    fn network_of(&self, ip: IpAddr) -> (u128, u8) {
        match ip.to_canonical() {
            IpAddr::V4(v4) => {
                let bits = u128::from(v4.to_ipv6_mapped());
                let len = 96 + self.ipv4_prefix;
                (bits & mask(len), len)
            }
            IpAddr::V6(v6) => (u128::from(v6) & mask(self.ipv6_prefix), self.ipv6_prefix),
        }
    }
}

fn mask(len: u8) -> u128 {
    if len == 0 {
        0
    } else {
        u128::MAX << (128 - u32::from(len.min(128)))
    }
}

/// What a request taught us about its key's networks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sighting {
    /// Seen from this network before (within the history).
    Known,
    /// The key's first recorded use.
    FirstUse,
    /// A network outside the history; `previous` networks were in it.
    NewNetwork { previous: usize },
}

/// Where the history lives. Cluster mode adds a shared variant behind the same methods.
pub enum NetworkStore {
    Local(LocalNetworks),
}

impl Default for NetworkStore {
    fn default() -> Self {
        NetworkStore::Local(LocalNetworks::default())
    }
}

impl NetworkStore {
    /// Records that `key_id` was used from `ip` at unix second `now`.
    pub async fn observe(
        &self,
        key_id: &str,
        ip: IpAddr,
        now: i64,
        policy: &NetworkPolicy,
    ) -> Sighting {
        match self {
            NetworkStore::Local(l) => l.observe(key_id, ip, now, policy),
        }
    }

    pub fn local(&self) -> Option<&LocalNetworks> {
        match self {
            NetworkStore::Local(l) => Some(l),
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    net: u128,
    len: u8,
    last_seen: i64,
}

/// Process-local history.
#[derive(Default)]
pub struct LocalNetworks {
    keys: RwLock<HashMap<Box<str>, Mutex<Vec<Entry>>>>,
    dirty: AtomicBool,
}

/// `last_seen` is refreshed at most this often (seconds).
const REFRESH_SECS: i64 = 3600;

/// One network in the state file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkRecord {
    /// CIDR, e.g. `192.0.2.0/24`.
    pub net: String,
    /// Unix seconds.
    pub last_seen: i64,
}

impl LocalNetworks {
    pub fn observe(&self, key_id: &str, ip: IpAddr, now: i64, policy: &NetworkPolicy) -> Sighting {
        let (net, len) = policy.network_of(ip);
        {
            let map = self.keys.read().unwrap_or_else(|p| p.into_inner());
            if let Some(h) = map.get(key_id) {
                let mut h = h.lock().unwrap_or_else(|p| p.into_inner());
                return self.record(&mut h, net, len, now, policy);
            }
        }
        let mut map = self.keys.write().unwrap_or_else(|p| p.into_inner());
        let h = map
            .entry(key_id.into())
            .or_default()
            .get_mut()
            .unwrap_or_else(|p| p.into_inner());
        if h.is_empty() {
            h.push(Entry {
                net,
                len,
                last_seen: now,
            });
            self.dirty.store(true, Relaxed);
            Sighting::FirstUse
        } else {
            self.record(h, net, len, now, policy)
        }
    }

    fn record(
        &self,
        h: &mut Vec<Entry>,
        net: u128,
        len: u8,
        now: i64,
        policy: &NetworkPolicy,
    ) -> Sighting {
        let horizon = now - policy.remember_secs;
        if let Some(e) = h.iter_mut().find(|e| e.net == net && e.len == len)
            && e.last_seen >= horizon
        {
            if now - e.last_seen >= REFRESH_SECS {
                e.last_seen = now;
                self.dirty.store(true, Relaxed);
            }
            return Sighting::Known;
        }
        // New (or forgotten): drop what is past the horizon, make room, remember this one.
        h.retain(|e| e.last_seen >= horizon && !(e.net == net && e.len == len));
        let previous = h.len();
        if h.len() >= policy.max_per_key.max(1)
            && let Some(oldest) = h
                .iter()
                .enumerate()
                .min_by_key(|(_, e)| e.last_seen)
                .map(|(i, _)| i)
        {
            h.swap_remove(oldest);
        }
        h.push(Entry {
            net,
            len,
            last_seen: now,
        });
        self.dirty.store(true, Relaxed);
        Sighting::NewNetwork { previous }
    }

    /// Networks in `key_id`'s history that are within the horizon at `now`.
    pub fn count(&self, key_id: &str, now: i64, policy: &NetworkPolicy) -> usize {
        let map = self.keys.read().unwrap_or_else(|p| p.into_inner());
        map.get(key_id).map_or(0, |h| {
            let h = h.lock().unwrap_or_else(|p| p.into_inner());
            h.iter()
                .filter(|e| e.last_seen >= now - policy.remember_secs)
                .count()
        })
    }

    /// The history for the state file (entries past the horizon left out).
    pub fn export(&self, now: i64, policy: &NetworkPolicy) -> BTreeMap<String, Vec<NetworkRecord>> {
        let map = self.keys.read().unwrap_or_else(|p| p.into_inner());
        map.iter()
            .map(|(id, h)| {
                let h = h.lock().unwrap_or_else(|p| p.into_inner());
                let list = h
                    .iter()
                    .filter(|e| e.last_seen >= now - policy.remember_secs)
                    .filter_map(|e| {
                        let net = if e.len >= 96 && (e.net >> 32) == 0xffff {
                            IpNet::new(
                                IpAddr::V4(std::net::Ipv4Addr::from((e.net & 0xffff_ffff) as u32)),
                                e.len - 96,
                            )
                        } else {
                            IpNet::new(IpAddr::V6(std::net::Ipv6Addr::from(e.net)), e.len)
                        };
                        net.ok().map(|n| NetworkRecord {
                            net: n.to_string(),
                            last_seen: e.last_seen,
                        })
                    })
                    .collect();
                (id.to_string(), list)
            })
            .filter(|(_, list): &(String, Vec<NetworkRecord>)| !list.is_empty())
            .collect()
    }

    /// Seeds the history from the state file. Entries that do not parse are skipped.
    pub fn import(&self, records: BTreeMap<String, Vec<NetworkRecord>>) {
        let mut map = self.keys.write().unwrap_or_else(|p| p.into_inner());
        for (id, list) in records {
            let entries: Vec<Entry> = list
                .iter()
                .filter_map(|r| {
                    let net: IpNet = r.net.parse().ok()?;
                    let (bits, len) = match net {
                        IpNet::V4(n) => (
                            u128::from(n.network().to_ipv6_mapped()),
                            96 + n.prefix_len(),
                        ),
                        IpNet::V6(n) => (u128::from(n.network()), n.prefix_len()),
                    };
                    Some(Entry {
                        net: bits,
                        len,
                        last_seen: r.last_seen,
                    })
                })
                .collect();
            map.insert(id.into_boxed_str(), Mutex::new(entries));
        }
    }

    /// Whether `key_id` has any history (used at all, as far as this store knows).
    pub fn knows(&self, key_id: &str) -> bool {
        self.keys
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(key_id)
    }

    pub fn take_dirty(&self) -> bool {
        self.dirty.swap(false, Relaxed)
    }

    pub fn mark_dirty(&self) {
        self.dirty.store(true, Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn first_use_known_and_new_networks() {
        let p = NetworkPolicy::default();
        let l = LocalNetworks::default();
        let t = 1_800_000_000;
        assert_eq!(l.observe("a", ip("192.0.2.7"), t, &p), Sighting::FirstUse);
        assert_eq!(l.observe("a", ip("192.0.2.200"), t, &p), Sighting::Known);
        assert_eq!(
            l.observe("a", ip("::ffff:192.0.2.9"), t, &p),
            Sighting::Known,
            "IPv4-mapped is the same /24"
        );
        assert_eq!(
            l.observe("a", ip("192.0.3.1"), t, &p),
            Sighting::NewNetwork { previous: 1 }
        );
        assert_eq!(
            l.observe("a", ip("2001:db8::1"), t, &p),
            Sighting::NewNetwork { previous: 2 }
        );
        assert_eq!(
            l.observe("a", ip("2001:db8::ffff:1"), t, &p),
            Sighting::Known,
            "same /64"
        );
        assert_eq!(
            l.observe("a", ip("2001:db8:0:1::1"), t, &p),
            Sighting::NewNetwork { previous: 3 }
        );
        assert_eq!(l.count("a", t, &p), 4);
        // Forgotten after the horizon: new again.
        let later = t + p.remember_secs + 1;
        assert_eq!(
            l.observe("a", ip("192.0.2.7"), later, &p),
            Sighting::NewNetwork { previous: 0 }
        );
        assert_eq!(l.count("a", later, &p), 1);
    }

    #[test]
    fn bounded_oldest_forgotten_first_and_roundtrip() {
        let p = NetworkPolicy {
            max_per_key: 3,
            ..Default::default()
        };
        let l = LocalNetworks::default();
        let t = 1_800_000_000;
        for i in 0..5u8 {
            l.observe("a", IpAddr::from([10, 0, i, 1]), t + i64::from(i), &p);
        }
        assert_eq!(l.count("a", t + 10, &p), 3);
        // 10.0.0.x and 10.0.1.x were the oldest: gone; 10.0.4.x stays.
        assert_eq!(l.observe("a", ip("10.0.4.9"), t + 10, &p), Sighting::Known);
        assert!(matches!(
            l.observe("a", ip("10.0.0.9"), t + 10, &p),
            Sighting::NewNetwork { .. }
        ));
        let exported = l.export(t + 10, &p);
        assert!(exported["a"].iter().any(|r| r.net == "10.0.4.0/24"));
        let back = LocalNetworks::default();
        back.import(exported);
        assert_eq!(
            back.observe("a", ip("10.0.4.1"), t + 11, &p),
            Sighting::Known
        );
        assert!(back.knows("a") && !back.knows("b"));
        let v6 = LocalNetworks::default();
        v6.observe("b", ip("2001:db8::5"), t, &p);
        let e = v6.export(t, &p);
        assert_eq!(e["b"][0].net, "2001:db8::/64");
    }
}
