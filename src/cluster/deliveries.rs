//! Webhook delivery ids shared by every instance (SPEC §10, §11), so that a delivery accepted
//! through one instance is a duplicate on all of them.
//!
//! One Redis string per delivery id, `<prefix>wh:<32 hex digits>`: the hex is the 128-bit
//! SHA-256 prefix of `route id, delivery id` that the local store keeps too, so the key has a
//! fixed size whatever the sender sends and no delivery id is ever written to Redis. Its value
//! is the delivery's state, and every write sets an expiry:
//!
//! * claim: `SET … "f" NX PX <in-flight limit>` (atomic with the read of an existing state, in
//!   one script): not there → ours to forward; `"a"` → accepted (duplicate); `"f"` → in flight
//!   through some instance;
//! * accepted (2xx): `SET … "a" PX <window>`;
//! * released (4xx, 5xx, timeout, disconnect): deleted if still `"f"`, so the retry is
//!   forwarded, wherever it arrives.

use redis::Script;

use super::{Cluster, ClusterError};
use crate::webhook::Claim;

/// KEYS[1] = the id's key; ARGV[1] = in-flight expiry in ms. 0 fresh (claimed), 1 accepted,
/// 2 in flight.
const CLAIM_LUA: &str = r"
if redis.call('SET', KEYS[1], 'f', 'NX', 'PX', ARGV[1]) then return 0 end
if redis.call('GET', KEYS[1]) == 'a' then return 1 end
return 2
";

/// KEYS[1] = the id's key. Deletes an in-flight marker (never an acceptance).
const RELEASE_LUA: &str = r"
if redis.call('GET', KEYS[1]) == 'f' then redis.call('DEL', KEYS[1]) end
return 0
";

fn claim_script() -> &'static Script {
    static S: std::sync::OnceLock<Script> = std::sync::OnceLock::new();
    S.get_or_init(|| Script::new(CLAIM_LUA))
}

fn release_script() -> &'static Script {
    static S: std::sync::OnceLock<Script> = std::sync::OnceLock::new();
    S.get_or_init(|| Script::new(RELEASE_LUA))
}

impl Cluster {
    fn delivery_key(&self, id_hash: &[u8; 16]) -> String {
        self.key(&["wh", &hex::encode(id_hash)])
    }

    /// Claims a delivery id cluster-wide (see the module doc). `in_flight_ms` bounds how long a
    /// claim whose instance died before settling keeps the id busy.
    pub async fn delivery_claim(
        &self,
        id_hash: &[u8; 16],
        in_flight_ms: u64,
    ) -> Result<Claim, ClusterError> {
        let key = self.delivery_key(id_hash);
        let state: i64 = self
            .run(move |mut c| async move {
                claim_script()
                    .key(key)
                    .arg(in_flight_ms.max(1))
                    .invoke_async(&mut c)
                    .await
            })
            .await?;
        Ok(match state {
            0 => Claim::Fresh,
            1 => Claim::Accepted,
            _ => Claim::InFlight,
        })
    }

    /// Settles a claimed id: accepted ones are kept `window_ms`, others released.
    pub async fn delivery_settle(
        &self,
        id_hash: &[u8; 16],
        accepted: bool,
        window_ms: u64,
    ) -> Result<(), ClusterError> {
        let key = self.delivery_key(id_hash);
        if accepted {
            self.run(move |mut c| async move {
                redis::cmd("SET")
                    .arg(key)
                    .arg("a")
                    .arg("PX")
                    .arg(window_ms.max(1))
                    .query_async::<()>(&mut c)
                    .await
            })
            .await
        } else {
            self.run(move |mut c| async move {
                release_script().key(key).invoke_async::<i64>(&mut c).await
            })
            .await
            .map(|_| ())
        }
    }
}
