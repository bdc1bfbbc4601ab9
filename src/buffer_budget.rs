//! The request-buffer budget: request-body bytes keygate holds in memory at once, over every
//! connection. Two kinds of body are held whole before anything reaches the upstream: small API
//! request bodies (request buffering, `server.request_buffer_bytes`, so a slow client costs the
//! upstream nothing until its request is complete) and webhook deliveries (read whole to check
//! their signature).
//!
//! * All together hold at most [`REQUEST_BUFFER_BUDGET`] (64 MiB).
//! * Webhook deliveries, which anyone who reaches a route can send unauthenticated, hold at most
//!   [`WEBHOOK_BUFFER_SHARE`] (half of it) among them, so they can never take the budget API
//!   clients' request buffering relies on. A fresh user's 70 stalled deliveries, each declaring
//!   1 MiB and sending 1 KB, reserved the whole 64 MiB (declared lengths were reserved up front):
//!   every real delivery got 503 and every API client's body streamed again, pinning upstream
//!   connections, for `request_buffer_timeout`, with no metric showing it.
//! * A delivery reserves what it has received (its buffer's capacity, which grows by doubling),
//!   starting from [`WEBHOOK_ALLOWANCE`], not what it declares: stalling costs the sender the
//!   bytes it really sent. (API bodies are small and come from authenticated clients: they
//!   still reserve their declared length, or `request_buffer_bytes` when chunked.)
//!
//! In use now: `keygate_request_buffer_bytes{use}` (set when `/metrics` is scraped); requests
//! that found their share spent: `keygate_request_buffer_exhausted_total{use}`.

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

pub use crate::upstream_cap::REQUEST_BUFFER_BUDGET;

/// Bytes all webhook deliveries being read may hold together: half of the budget.
pub const WEBHOOK_BUFFER_SHARE: usize = REQUEST_BUFFER_BUDGET / 2;

/// What a webhook delivery reserves before its first byte (or its declared length, if smaller):
/// enough for most deliveries, which are a few KiB, to be read without growing.
pub const WEBHOOK_ALLOWANCE: usize = 16 * 1024;

/// Who a reservation is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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
}

/// The budget (see the module docs). One per process.
pub struct BufferBudget {
    total: Arc<Semaphore>,
    webhook: Arc<Semaphore>,
}

impl Default for BufferBudget {
    fn default() -> Self {
        BufferBudget {
            total: Arc::new(Semaphore::new(REQUEST_BUFFER_BUDGET)),
            webhook: Arc::new(Semaphore::new(WEBHOOK_BUFFER_SHARE)),
        }
    }
}

/// Bytes reserved in the budget; given back when dropped.
#[derive(Debug)]
pub struct BufferReservation {
    total: OwnedSemaphorePermit,
    /// The webhook share's part (a delivery's reservation only).
    share: Option<OwnedSemaphorePermit>,
}

impl BufferReservation {
    /// Bytes reserved.
    pub fn bytes(&self) -> usize {
        self.total.num_permits()
    }
}

impl BufferBudget {
    /// Reserves `bytes` for `r#use` without waiting; `None` (counted in
    /// `keygate_request_buffer_exhausted_total`) if the budget, or the webhook share, has not
    /// that much room.
    pub fn try_reserve(&self, r#use: Use, bytes: usize) -> Option<BufferReservation> {
        let r = self.take(r#use == Use::Webhook, bytes);
        if r.is_none() {
            crate::metrics::global().request_buffer_exhausted(r#use.as_str());
        }
        r
    }

    /// Grows `held` (or makes it, if `None`) to `bytes` in all; false (counted like
    /// [`try_reserve`](Self::try_reserve)) if there is no room, leaving it as it was.
    pub fn grow(&self, r#use: Use, held: &mut Option<BufferReservation>, bytes: usize) -> bool {
        let have = held.as_ref().map_or(0, BufferReservation::bytes);
        if bytes <= have {
            return true;
        }
        let Some(more) = self.try_reserve(r#use, bytes - have) else {
            return false;
        };
        match held {
            Some(h) => {
                h.total.merge(more.total);
                match (&mut h.share, more.share) {
                    (Some(s), Some(m)) => s.merge(m),
                    (s @ None, m) => *s = m,
                    (Some(_), None) => {}
                }
            }
            None => *held = Some(more),
        }
        true
    }

    fn take(&self, webhook: bool, bytes: usize) -> Option<BufferReservation> {
        let n = u32::try_from(bytes).ok()?;
        // The share first: a delivery refused by its share takes nothing from the total.
        let share = if webhook {
            Some(self.webhook.clone().try_acquire_many_owned(n).ok()?)
        } else {
            None
        };
        let total = self.total.clone().try_acquire_many_owned(n).ok()?;
        Some(BufferReservation { total, share })
    }

    /// Bytes reserved now, by use: (API, webhook).
    pub fn in_use(&self) -> (usize, usize) {
        let all = REQUEST_BUFFER_BUDGET.saturating_sub(self.total.available_permits());
        let webhook = WEBHOOK_BUFFER_SHARE.saturating_sub(self.webhook.available_permits());
        (all.saturating_sub(webhook), webhook)
    }

    /// Sets `keygate_request_buffer_bytes` (at scrape time).
    pub fn export(&self) {
        let (api, webhook) = self.in_use();
        let m = crate::metrics::global();
        m.set_request_buffer_bytes(Use::Api.as_str(), api);
        m.set_request_buffer_bytes(Use::Webhook.as_str(), webhook);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn webhooks_hold_at_most_their_share_and_api_bodies_keep_the_rest() {
        let b = BufferBudget::default();
        let mut hooks = None;
        assert!(b.grow(Use::Webhook, &mut hooks, WEBHOOK_BUFFER_SHARE));
        assert!(!b.grow(Use::Webhook, &mut hooks, WEBHOOK_BUFFER_SHARE + 1));
        assert!(
            b.try_reserve(Use::Webhook, 1).is_none(),
            "the share is spent"
        );
        assert_eq!(b.in_use(), (0, WEBHOOK_BUFFER_SHARE));
        // API buffering still has the other half.
        let api = b
            .try_reserve(Use::Api, REQUEST_BUFFER_BUDGET - WEBHOOK_BUFFER_SHARE)
            .unwrap();
        assert!(b.try_reserve(Use::Api, 1).is_none());
        assert_eq!(
            b.in_use(),
            (
                REQUEST_BUFFER_BUDGET - WEBHOOK_BUFFER_SHARE,
                WEBHOOK_BUFFER_SHARE
            )
        );
        drop(hooks);
        assert_eq!(b.in_use().1, 0);
        // API bodies may use the whole budget; then a delivery finds no room in the total.
        let more = b.try_reserve(Use::Api, WEBHOOK_BUFFER_SHARE).unwrap();
        assert!(b.try_reserve(Use::Webhook, 1).is_none());
        assert_eq!(b.in_use(), (REQUEST_BUFFER_BUDGET, 0), "nothing leaked");
        drop((api, more));
        assert_eq!(b.in_use(), (0, 0));
        let mut grown = None;
        assert!(b.grow(Use::Webhook, &mut grown, 10));
        assert!(b.grow(Use::Webhook, &mut grown, 100));
        assert_eq!(grown.as_ref().map(BufferReservation::bytes), Some(100));
        assert_eq!(b.in_use(), (0, 100));
    }
}
