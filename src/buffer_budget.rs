//! The request-buffer budget: request-body bytes keygate holds in memory at once, over every
//! connection. Two kinds of body are held whole before anything reaches the upstream: small API
//! request bodies (request buffering, `server.request_buffer_bytes`, so a slow client costs the
//! upstream nothing until its request is complete) and webhook deliveries (read whole to check
//! their signature).
//!
//! * All together hold at most [`REQUEST_BUFFER_BUDGET`] (64 MiB), in two equal halves: API
//!   request buffering holds at most [`API_BUFFER_SHARE`] and webhook deliveries, which anyone
//!   who reaches a route can send unauthenticated, at most [`WEBHOOK_BUFFER_SHARE`]; neither
//!   can take the other's half. (Before, API bodies could take the whole budget: four keys'
//!   1,024 slow uploads left no room for any webhook delivery, fresh user T8-5.)
//! * Inside each half, one client holds at most [`CLIENT_SHARE_DIVISOR`]th of it (2 MiB): an
//!   address (IPv4 /32, IPv6 /64), and for API bodies also a key, whichever address it comes
//!   from. A webhook delivery's address may always hold one whole delivery of its route
//!   (`max_body_bytes`, at most the half) if that is more. Past its share a client's API bodies
//!   stream (as when the half is spent) and its deliveries are refused 503, while other clients
//!   are still served: ~2,000 stalled deliveries from 10 addresses held the whole webhook half
//!   before (T8-4), so every genuine delivery got 503.
//! * A body reserves what it has received, not what it declares: [`FIRST_STEP`] (or its
//!   declared length, if smaller) before its first byte, then its buffer doubles as bytes
//!   arrive, each step reserved before it is allocated. Stalling costs a client the bytes it
//!   really sent (1 KiB per stalled body at most beyond them). Before, a delivery reserved
//!   16 KiB before its first byte and an API body its whole declared length.
//!
//! In use now: `keygate_request_buffer_bytes{use}` (set when `/metrics` is scraped); bodies that
//! found their half spent: `keygate_request_buffer_exhausted_total{use}`; bodies whose client
//! held its share: `keygate_request_buffer_client_share_spent_total{use}`.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::conn_limits::AddrKey;
pub use crate::upstream_cap::REQUEST_BUFFER_BUDGET;

/// Bytes all webhook deliveries being read may hold together: half of the budget.
pub const WEBHOOK_BUFFER_SHARE: usize = REQUEST_BUFFER_BUDGET / 2;

/// Bytes all buffered API request bodies may hold together: the other half.
pub const API_BUFFER_SHARE: usize = REQUEST_BUFFER_BUDGET - WEBHOOK_BUFFER_SHARE;

/// One client (address, or API key) holds at most 1/16 of its use's half: 2 MiB, as one
/// address holds at most 1/16 of the connection table by default.
pub const CLIENT_SHARE_DIVISOR: usize = 16;

/// What a body reserves before its first byte (or its declared length, if smaller), and the
/// smallest step its buffer grows by: 1 KiB.
pub const FIRST_STEP: usize = 1024;

/// Who a reservation is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Use {
    /// An authenticated API request's body, buffered before forwarding.
    Api,
    /// A webhook delivery, read whole to check its signature.
    Webhook,
}

impl Use {
    pub fn as_str(self) -> &'static str {
        match self {
            Use::Api => "api",
            Use::Webhook => "webhook",
        }
    }

    /// The half this use may hold.
    pub fn share(self) -> usize {
        match self {
            Use::Api => API_BUFFER_SHARE,
            Use::Webhook => WEBHOOK_BUFFER_SHARE,
        }
    }
}

/// A client as charged by the per-client share.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Holder {
    Addr(Use, AddrKey),
    /// An API key, by id (API bodies only).
    Key(Arc<str>),
}

/// Who is reserving: the use, the client's address (and key), and how much one client may hold.
#[derive(Debug, Clone)]
pub struct Claimant {
    r#use: Use,
    addr: Holder,
    key: Option<Holder>,
    /// Bytes one holder may have reserved in all.
    cap: usize,
}

impl Claimant {
    /// An API request body from `client_ip` with the key `key_id`.
    pub fn api(client_ip: IpAddr, key_id: &Arc<str>) -> Self {
        Claimant {
            r#use: Use::Api,
            addr: Holder::Addr(Use::Api, AddrKey::of(client_ip)),
            key: Some(Holder::Key(key_id.clone())),
            cap: API_BUFFER_SHARE / CLIENT_SHARE_DIVISOR,
        }
    }

    /// A webhook delivery from `client_ip` to a route accepting bodies of up to
    /// `max_body_bytes`: the address may hold one whole delivery even when that is more than
    /// its share.
    pub fn webhook(client_ip: IpAddr, max_body_bytes: u64) -> Self {
        let share = WEBHOOK_BUFFER_SHARE / CLIENT_SHARE_DIVISOR;
        Claimant {
            r#use: Use::Webhook,
            addr: Holder::Addr(Use::Webhook, AddrKey::of(client_ip)),
            key: None,
            cap: usize::try_from(max_body_bytes).map_or(share, |m| m.max(share)),
        }
    }

    pub fn r#use(&self) -> Use {
        self.r#use
    }
}

/// Why a reservation was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Full {
    /// The use's half is spent (`keygate_request_buffer_exhausted_total`).
    Share,
    /// The client holds its share of the half
    /// (`keygate_request_buffer_client_share_spent_total`).
    Client,
}

type Holders = Mutex<HashMap<Holder, usize>>;

fn lock(h: &Holders) -> std::sync::MutexGuard<'_, HashMap<Holder, usize>> {
    h.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The budget (see the module docs). One per process.
pub struct BufferBudget {
    api: Arc<Semaphore>,
    webhook: Arc<Semaphore>,
    /// Bytes each client holds now; an entry lives while one of its reservations does, so the
    /// table never has more entries than there are bodies being buffered.
    holders: Arc<Holders>,
}

impl Default for BufferBudget {
    fn default() -> Self {
        BufferBudget {
            api: Arc::new(Semaphore::new(API_BUFFER_SHARE)),
            webhook: Arc::new(Semaphore::new(WEBHOOK_BUFFER_SHARE)),
            holders: Arc::default(),
        }
    }
}

/// Bytes reserved in the budget, for one client; given back when dropped. Boxed (one small
/// allocation per buffered body, beside its buffer's): it is part of every request's future
/// (`upstream_cap::Held`), which must stay small.
#[derive(Debug)]
pub struct BufferReservation(Box<Reserved>);

#[derive(Debug)]
struct Reserved {
    permit: OwnedSemaphorePermit,
    who: Claimant,
    holders: Arc<Holders>,
}

impl BufferReservation {
    /// Bytes reserved.
    pub fn bytes(&self) -> usize {
        self.0.permit.num_permits()
    }
}

impl Drop for Reserved {
    fn drop(&mut self) {
        let n = self.permit.num_permits();
        let mut t = lock(&self.holders);
        for h in std::iter::once(&self.who.addr).chain(self.who.key.as_ref()) {
            if let Some(held) = t.get_mut(h) {
                *held = held.saturating_sub(n);
                if *held == 0 {
                    t.remove(h);
                }
            }
        }
    }
}

impl BufferBudget {
    /// Grows `held` (or makes it, if `None`) to `bytes` in all for `who`; refused (counted in
    /// `keygate_request_buffer_exhausted_total` or `..._client_share_spent_total`) if the use's
    /// half, or the client's share of it, has not that much room, leaving `held` as it was.
    pub fn grow(
        &self,
        who: &Claimant,
        held: &mut Option<BufferReservation>,
        bytes: usize,
    ) -> Result<(), Full> {
        let have = held.as_ref().map_or(0, BufferReservation::bytes);
        if bytes <= have {
            return Ok(());
        }
        let more = match self.take(who, bytes - have) {
            Ok(more) => more,
            Err(why) => {
                let m = crate::metrics::global();
                match why {
                    Full::Share => m.request_buffer_exhausted(who.r#use.as_str()),
                    Full::Client => m.request_buffer_client_share_spent(who.r#use.as_str()),
                }
                return Err(why);
            }
        };
        match held {
            Some(h) => h.0.permit.merge(more),
            None => {
                *held = Some(BufferReservation(Box::new(Reserved {
                    permit: more,
                    who: who.clone(),
                    holders: self.holders.clone(),
                })))
            }
        }
        Ok(())
    }

    fn take(&self, who: &Claimant, bytes: usize) -> Result<OwnedSemaphorePermit, Full> {
        let n = u32::try_from(bytes).map_err(|_| Full::Share)?;
        let mut t = lock(&self.holders);
        let holders = std::iter::once(&who.addr).chain(who.key.as_ref());
        if holders
            .clone()
            .any(|h| t.get(h).copied().unwrap_or(0) + bytes > who.cap)
        {
            return Err(Full::Client);
        }
        let share = match who.r#use {
            Use::Api => &self.api,
            Use::Webhook => &self.webhook,
        };
        let permit = share
            .clone()
            .try_acquire_many_owned(n)
            .map_err(|_| Full::Share)?;
        for h in holders {
            *t.entry(h.clone()).or_insert(0) += bytes;
        }
        Ok(permit)
    }

    /// Bytes reserved now, by use: (API, webhook).
    pub fn in_use(&self) -> (usize, usize) {
        (
            API_BUFFER_SHARE.saturating_sub(self.api.available_permits()),
            WEBHOOK_BUFFER_SHARE.saturating_sub(self.webhook.available_permits()),
        )
    }

    /// Clients holding part of the budget now (addresses and keys).
    pub fn holders(&self) -> usize {
        lock(&self.holders).len()
    }

    /// Sets `keygate_request_buffer_bytes` (at scrape time).
    pub fn export(&self) {
        let (api, webhook) = self.in_use();
        let m = crate::metrics::global();
        m.set_request_buffer_bytes(Use::Api.as_str(), api);
        m.set_request_buffer_bytes(Use::Webhook.as_str(), webhook);
    }
}

/// A body's buffer whose capacity is reserved in the budget before it is allocated: it starts
/// at [`FIRST_STEP`] (or `ceiling`, if smaller) and doubles as bytes arrive, up to `ceiling`
/// (the declared length, or the most that will be read) unless a frame needs more.
pub struct ChargedBuf {
    data: bytes::BytesMut,
    ceiling: usize,
}

impl ChargedBuf {
    /// Reserves the first step for `who` (in `held`, which the caller keeps as long as the
    /// bytes are held) and makes the buffer; refused like [`BufferBudget::grow`].
    pub fn start(
        budget: &BufferBudget,
        who: &Claimant,
        held: &mut Option<BufferReservation>,
        ceiling: usize,
    ) -> Result<Self, Full> {
        let first = ceiling.min(FIRST_STEP);
        budget.grow(who, held, first)?;
        Ok(ChargedBuf {
            data: bytes::BytesMut::with_capacity(first),
            ceiling,
        })
    }

    /// Appends `d`, growing the buffer (reserved first) if it has no room; refused like
    /// [`BufferBudget::grow`], and then nothing is appended.
    pub fn push(
        &mut self,
        budget: &BufferBudget,
        who: &Claimant,
        held: &mut Option<BufferReservation>,
        d: &[u8],
    ) -> Result<(), Full> {
        let need = self.data.len() + d.len();
        if self.data.capacity() < need {
            // Doubling, as `extend_from_slice` would, up to the ceiling (a frame past it is
            // the caller's to refuse or keep).
            let want = need
                .max(self.data.capacity() * 2)
                .max(FIRST_STEP)
                .min(self.ceiling.max(need));
            budget.grow(who, held, want)?;
            // Exactly `want` (`reserve` may round a vector up to twice its capacity).
            let mut grown = bytes::BytesMut::with_capacity(want);
            grown.extend_from_slice(&self.data);
            self.data = grown;
        }
        self.data.extend_from_slice(d);
        Ok(())
    }

    /// Bytes held.
    pub fn len(&self) -> usize {
        self.data.len()
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// The bytes; the reservation stays with the caller's `held`.
    pub fn into_inner(self) -> bytes::BytesMut {
        self.data
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn each_use_holds_at_most_its_half() {
        let b = BufferBudget::default();
        let share = WEBHOOK_BUFFER_SHARE / CLIENT_SHARE_DIVISOR;
        let mut hooks = Vec::new();
        for i in 0..CLIENT_SHARE_DIVISOR {
            let who = Claimant::webhook(ip(&format!("192.0.2.{i}")), 1024);
            let mut held = None;
            assert_eq!(b.grow(&who, &mut held, share), Ok(()));
            hooks.push(held);
        }
        let late = Claimant::webhook(ip("198.51.100.1"), 1024);
        assert_eq!(b.grow(&late, &mut None, 1), Err(Full::Share));
        assert_eq!(b.in_use(), (0, WEBHOOK_BUFFER_SHARE));
        // API buffering has its own half, and cannot take the webhooks'.
        let mut api = Vec::new();
        for i in 0..CLIENT_SHARE_DIVISOR {
            let who = Claimant::api(ip(&format!("192.0.2.{i}")), &Arc::from(format!("k{i}")));
            let mut held = None;
            assert_eq!(b.grow(&who, &mut held, share), Ok(()));
            api.push(held);
        }
        let k = Arc::from("other");
        assert_eq!(
            b.grow(&Claimant::api(ip("198.51.100.1"), &k), &mut None, 1),
            Err(Full::Share)
        );
        assert_eq!(b.in_use(), (API_BUFFER_SHARE, WEBHOOK_BUFFER_SHARE));
        drop(hooks);
        assert_eq!(
            b.grow(&Claimant::api(ip("198.51.100.1"), &k), &mut None, 1),
            Err(Full::Share),
            "the webhooks' free half is not the API's"
        );
        drop(api);
        assert_eq!(b.in_use(), (0, 0));
        assert_eq!(b.holders(), 0, "no entry outlives its reservations");
    }

    #[test]
    fn one_client_holds_at_most_its_share() {
        let b = BufferBudget::default();
        let share = API_BUFFER_SHARE / CLIENT_SHARE_DIVISOR;
        let k1: Arc<str> = Arc::from("k1");
        let k2: Arc<str> = Arc::from("k2");
        // One address, many bodies: up to the share, in steps.
        let a = Claimant::api(ip("2001:db8:1:2::1"), &k1);
        let mut held = None;
        assert_eq!(b.grow(&a, &mut held, share / 2), Ok(()));
        let mut more = None;
        assert_eq!(b.grow(&a, &mut more, share / 2), Ok(()));
        assert_eq!(b.grow(&a, &mut more, share / 2 + 1), Err(Full::Client));
        assert_eq!(more.as_ref().map(BufferReservation::bytes), Some(share / 2));
        // The same /64 is the same client; the same key from another address too.
        let same64 = Claimant::api(ip("2001:db8:1:2:ffff::9"), &k2);
        assert_eq!(b.grow(&same64, &mut None, 1), Err(Full::Client));
        let same_key = Claimant::api(ip("203.0.113.7"), &k1);
        assert_eq!(b.grow(&same_key, &mut None, 1), Err(Full::Client));
        // Another key from another address is not affected.
        let other = Claimant::api(ip("2001:db8:1:3::1"), &k2);
        let mut o = None;
        assert_eq!(b.grow(&other, &mut o, share), Ok(()));
        // Webhook deliveries from the same address are counted apart from its API bodies, and
        // may hold one whole delivery of their route even past the share.
        let w = Claimant::webhook(ip("2001:db8:1:2::1"), 3 * share as u64);
        let mut wh = None;
        assert_eq!(b.grow(&w, &mut wh, 3 * share), Ok(()));
        assert_eq!(b.grow(&w, &mut None, 1), Err(Full::Client));
        drop((held, more));
        assert_eq!(b.grow(&same_key, &mut None, share), Ok(()));
        drop((o, wh));
        assert_eq!((b.in_use(), b.holders()), ((0, 0), 0));
    }

    #[test]
    fn a_buffer_is_charged_for_what_arrives() {
        let b = BufferBudget::default();
        let who = Claimant::webhook(ip("192.0.2.1"), 1 << 20);
        let mut held = None;
        // Declares 1 MiB: reserves 1 KiB before its first byte.
        let mut buf = ChargedBuf::start(&b, &who, &mut held, 1 << 20).unwrap();
        assert_eq!(b.in_use().1, FIRST_STEP);
        buf.push(&b, &who, &mut held, b"x").unwrap();
        assert_eq!(b.in_use().1, FIRST_STEP, "one byte fits the first step");
        buf.push(&b, &who, &mut held, &[b'y'; 5000]).unwrap();
        assert_eq!(b.in_use().1, 5001);
        buf.push(&b, &who, &mut held, &[b'z'; 10]).unwrap();
        assert_eq!(b.in_use().1, 10002, "doubles");
        assert_eq!(buf.len(), 5011);
        // A small declared length is reserved as it is, and never more.
        let mut small = None;
        let mut s = ChargedBuf::start(&b, &who, &mut small, 10).unwrap();
        s.push(&b, &who, &mut small, b"0123456789").unwrap();
        assert_eq!(small.as_ref().map(BufferReservation::bytes), Some(10));
        drop((buf, held, s, small));
        assert_eq!((b.in_use(), b.holders()), ((0, 0), 0));
    }
}
