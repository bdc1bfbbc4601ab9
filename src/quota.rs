//! Quotas (spend limits, SPEC §9): `quota = "N/day"` or `"N/month"` per key or role, counted in
//! calendar windows in UTC (a day starts at 00:00 UTC, a month on the 1st at 00:00 UTC).
//!
//! Place in the request path: after the rate limit, before forwarding. A request refused by the
//! rate limit therefore costs no quota, and one keygate refuses after the charge, before it
//! reaches the upstream (503 `upstream_saturated`, a body that fails while buffered), gets it
//! back ([`QuotaStore::refund`], `pipeline.rs` `QuotaCharge`). What a request costs comes from `[quota_costs]`
//! ([`CostTable`]); a request whose cost is 0 (a status poll) always passes, even when the quota
//! is used up, so a client can still collect the results of work it has paid for.
//!
//! The counters live in a [`QuotaStore`]: today the process-local [`LocalQuotas`]; cluster mode
//! (issue 14) adds a shared variant behind the same methods, so the pipeline does not change.
//! Usage is persisted with the state file (`usage.rs`) and survives restarts and reloads.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex, RwLock};

use http::Method;

use crate::access::PathReading;
use serde::{Deserialize, Serialize};

/// The length of a quota's calendar window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Period {
    /// 00:00 UTC to the next 00:00 UTC.
    Day,
    /// The 1st of the month 00:00 UTC to the 1st of the next month.
    Month,
}

impl Period {
    pub fn as_str(self) -> &'static str {
        match self {
            Period::Day => "day",
            Period::Month => "month",
        }
    }
}

/// `limit` cost units per calendar `period`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quota {
    pub limit: u64,
    pub period: Period,
}

/// `"N/day"` or `"N/month"`, N ≥ 1.
pub fn parse_quota(s: &str) -> Result<Quota, String> {
    let bad = || format!("invalid quota {s:?} (use \"N/day\" or \"N/month\" with N ≥ 1)");
    let (n, unit) = s.trim().split_once('/').ok_or_else(bad)?;
    let limit: u64 = n.trim().replace('_', "").parse().map_err(|_| bad())?;
    if limit == 0 {
        return Err(bad());
    }
    let period = match unit.trim() {
        "day" | "d" => Period::Day,
        "month" | "mo" => Period::Month,
        _ => return Err(bad()),
    };
    Ok(Quota { limit, period })
}

const DAY: i64 = 86_400;

/// The calendar window (start, end) in unix seconds, UTC, that contains `now`.
pub fn window(period: Period, now: i64) -> (i64, i64) {
    match period {
        Period::Day => {
            let start = now.div_euclid(DAY) * DAY;
            (start, start + DAY)
        }
        Period::Month => {
            let date = jiff::Timestamp::from_second(now)
                .unwrap_or(jiff::Timestamp::UNIX_EPOCH)
                .to_zoned(jiff::tz::TimeZone::UTC)
                .date();
            let first = date.first_of_month();
            let next = first
                .checked_add(jiff::Span::new().months(1))
                .unwrap_or(first);
            let secs = |d: jiff::civil::Date| {
                d.to_zoned(jiff::tz::TimeZone::UTC)
                    .map_or(now, |z| z.timestamp().as_second())
            };
            (secs(first), secs(next))
        }
    }
}

/// `[quota_costs]`: the cost of a request by method and path prefix.
///
/// The most specific rule wins, whatever the order in the file: the longest path prefix, and at
/// equal length a rule naming methods before one for any method. Paths are matched segment-wise
/// on the normalised path, exactly as scopes are (`/v1/jobs/../convert` is `/v1/convert`), so a
/// differently spelled path cannot buy a cheaper rule.
///
/// Nor can a differently spelled *method* (fresh user T5-19): a rule naming `GET` also prices
/// `HEAD` (RFC 9110 §9.3.2: HEAD is GET without the content, and Starlette/FastAPI, Flask,
/// Django and Rails run the GET handler in full for it), unless a rule for the same path names
/// `HEAD` itself; and a `_method` override in the query (Laravel/Symfony, Express
/// `method-override`, `access::method_overrides`) costs at least what the method it names costs.
#[derive(Debug, Clone)]
pub struct CostTable {
    default: u64,
    /// Sorted most specific first.
    rules: Vec<CostRule>,
}

#[derive(Debug, Clone)]
pub struct CostRule {
    pub methods: Option<Vec<Method>>,
    pub path: String,
    pub cost: u64,
}

impl Default for CostTable {
    fn default() -> Self {
        CostTable {
            default: 1,
            rules: Vec::new(),
        }
    }
}

impl CostTable {
    pub fn new(default: u64, mut rules: Vec<CostRule>) -> Self {
        // A GET rule prices HEAD too, unless the operator priced HEAD for that path himself.
        let head_named: Vec<String> = rules
            .iter()
            .filter(|r| {
                r.methods
                    .as_ref()
                    .is_some_and(|ms| ms.contains(&Method::HEAD))
            })
            .map(|r| r.path.clone())
            .collect();
        for r in &mut rules {
            if let Some(ms) = &mut r.methods
                && ms.contains(&Method::GET)
                && !head_named.contains(&r.path)
            {
                ms.push(Method::HEAD);
            }
        }
        // Stable: ties keep file order.
        rules.sort_by_key(|r| (std::cmp::Reverse(r.path.len()), r.methods.is_none()));
        CostTable { default, rules }
    }

    /// What this request costs: the highest cost of any rule matching the path under some
    /// [`PathReading`], so no spelling of a costly path (e.g. `/jobs/..;/convert` under a free
    /// `/jobs/` rule) is cheaper than the path itself. Readings under which the path does not
    /// decode add nothing; a path that decodes under none (a bad escape) costs the default.
    /// A `_method` override in `query` costs at least what its method costs (see the type).
    pub fn cost(&self, method: &Method, path: &str, query: Option<&str>) -> u64 {
        if self.rules.is_empty() {
            return self.default;
        }
        let cost = self.cost_of_path(method, path);
        match query {
            None => cost,
            Some(q) => crate::access::method_overrides(q)
                .flatten()
                .map(|m| self.cost_of_path(&m, path))
                .fold(cost, u64::max),
        }
    }

    fn cost_of_path(&self, method: &Method, path: &str) -> u64 {
        if crate::access::is_plain_path(path) {
            return self.cost_of_normal(method, path);
        }
        PathReading::ALL
            .iter()
            .filter_map(|&r| crate::access::read_path(path, r))
            .map(|p| self.cost_of_normal(method, &p))
            .max()
            .unwrap_or(self.default)
    }

    /// The cost of an already-read path: the first (most specific) rule matching it, or the
    /// first matching it with ASCII case ignored if that costs more, because case-insensitive
    /// routers (ASP.NET Core's default, IIS, Windows file systems) serve `/CONVERT` as
    /// `/convert`.
    fn cost_of_normal(&self, method: &Method, path: &str) -> u64 {
        let first = |prefix_of: fn(&str, &str) -> bool| {
            self.rules
                .iter()
                .find(|r| {
                    r.methods.as_ref().is_none_or(|ms| ms.contains(method))
                        && prefix_of(path, &r.path)
                })
                .map_or(self.default, |r| r.cost)
        };
        first(crate::access::path_has_prefix).max(first(path_has_prefix_ignore_ascii_case))
    }
}

/// [`crate::access::path_has_prefix`] with ASCII case ignored.
fn path_has_prefix_ignore_ascii_case(path: &str, prefix: &str) -> bool {
    path.len() >= prefix.len()
        && path.as_bytes()[..prefix.len()].eq_ignore_ascii_case(prefix.as_bytes())
        && (prefix.ends_with('/')
            || path.len() == prefix.len()
            || path.as_bytes()[prefix.len()] == b'/')
}

/// A key's quota state after a request was counted (or refused), for the headers, the
/// introspection endpoint and the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuotaState {
    pub quota: Quota,
    /// Units used in the current window (this request included, if it was admitted).
    pub used: u64,
    /// `limit - used`, never negative.
    pub remaining: u64,
    /// Whole seconds until the window resets (≥ 1).
    pub reset_secs: u64,
    /// The window's length in seconds (86 400 for a day; 28 to 31 days for a month).
    pub window_secs: u64,
    /// `Some` when this request was refused: true for the window's first refusal that finds
    /// the quota **used up** (no unit left: the one `quota_exceeded` event per key and window).
    /// A refusal while units remain (the request costs more than is left) is `Some(false)`
    /// and does not spend the event (fresh user T5-18: a cost-10 request at `used: 0/5` logged
    /// "used up", and the real exhaustion later that window was silent).
    pub refused: Option<bool>,
}

/// Where quota counters live. One method per question the pipeline asks, so a shared backend
/// (cluster mode) is one more variant and no pipeline change.
pub enum QuotaStore {
    Local(LocalQuotas),
}

impl Default for QuotaStore {
    fn default() -> Self {
        QuotaStore::Local(LocalQuotas::default())
    }
}

impl QuotaStore {
    /// Counts `cost` units against `key_id`'s quota at unix second `now`, or refuses the
    /// request (nothing counted) if that would go over the limit. A cost of 0 always passes.
    pub async fn charge(&self, key_id: &str, quota: Quota, cost: u64, now: i64) -> QuotaState {
        match self {
            QuotaStore::Local(l) => l.charge(key_id, quota, cost, now),
        }
    }

    /// Gives back `cost` units charged at unix second `now` (a request refused by keygate
    /// before it reached the upstream, `pipeline.rs`), if the window has not changed since.
    pub fn refund(&self, key_id: &str, quota: Quota, cost: u64, now: i64) {
        match self {
            QuotaStore::Local(l) => l.refund(key_id, quota, cost, now),
        }
    }

    /// The state without counting anything (introspection).
    pub async fn peek(&self, key_id: &str, quota: Quota, now: i64) -> QuotaState {
        match self {
            QuotaStore::Local(l) => l.peek(key_id, quota, now),
        }
    }

    /// Units used in the current window, for `/metrics` and `keygate keys` (local counters).
    pub fn local(&self) -> Option<&LocalQuotas> {
        match self {
            QuotaStore::Local(l) => Some(l),
        }
    }
}

/// One key's counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuotaRecord {
    pub period: Period,
    /// Window start, unix seconds.
    pub window_start: i64,
    pub used: u64,
    /// The once-per-window `quota_exceeded` event (the quota used up) has been logged.
    #[serde(default)]
    pub exceeded_logged: bool,
    /// Window end, unix seconds: cached so that the hot path does no calendar arithmetic
    /// (0 = not known yet; not stored, it follows from the start).
    #[serde(skip)]
    pub window_end: i64,
}

/// Process-local counters: one small mutex per key (uncontended unless one key is used from
/// many connections at once), found with one hash lookup under a read lock.
#[derive(Default)]
pub struct LocalQuotas {
    counters: RwLock<HashMap<Box<str>, Arc<Mutex<QuotaRecord>>>>,
    dirty: AtomicBool,
}

impl LocalQuotas {
    fn counter(&self, key_id: &str, quota: Quota, now: i64) -> Arc<Mutex<QuotaRecord>> {
        if let Some(c) = self
            .counters
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(key_id)
        {
            return c.clone();
        }
        self.counters
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .entry(key_id.into())
            .or_insert_with(|| {
                let (window_start, window_end) = window(quota.period, now);
                Arc::new(Mutex::new(QuotaRecord {
                    period: quota.period,
                    window_start,
                    used: 0,
                    exceeded_logged: false,
                    window_end,
                }))
            })
            .clone()
    }

    fn with_current<T>(
        &self,
        key_id: &str,
        quota: Quota,
        now: i64,
        f: impl FnOnce(&mut QuotaRecord, i64) -> T,
    ) -> T {
        let counter = self.counter(key_id, quota, now);
        let mut c = counter.lock().unwrap_or_else(|p| p.into_inner());
        // A new window (or a changed period): start from zero. Calendar arithmetic only when
        // `now` leaves the cached window.
        if c.period != quota.period || now < c.window_start || now >= c.window_end {
            let (start, end) = window(quota.period, now);
            if c.period != quota.period || c.window_start != start {
                *c = QuotaRecord {
                    period: quota.period,
                    window_start: start,
                    used: 0,
                    exceeded_logged: false,
                    window_end: end,
                };
                self.dirty.store(true, Relaxed);
            }
            c.window_end = end;
        }
        let end = c.window_end;
        f(&mut c, end)
    }

    pub fn charge(&self, key_id: &str, quota: Quota, cost: u64, now: i64) -> QuotaState {
        self.with_current(key_id, quota, now, |c, end| {
            let mut refused = None;
            if cost > 0 {
                if c.used.saturating_add(cost) > quota.limit {
                    let first = c.used >= quota.limit && !c.exceeded_logged;
                    refused = Some(first);
                    if first {
                        c.exceeded_logged = true;
                        self.dirty.store(true, Relaxed);
                    }
                } else {
                    c.used += cost;
                    self.dirty.store(true, Relaxed);
                }
            }
            state(quota, c, now, end, refused)
        })
    }

    /// See [`QuotaStore::refund`].
    pub fn refund(&self, key_id: &str, quota: Quota, cost: u64, now: i64) {
        let (start, _) = window(quota.period, now);
        self.with_current(key_id, quota, crate::clock::now(), |c, _| {
            if c.window_start == start && cost > 0 {
                c.used = c.used.saturating_sub(cost);
                self.dirty.store(true, Relaxed);
            }
        });
    }

    pub fn peek(&self, key_id: &str, quota: Quota, now: i64) -> QuotaState {
        self.with_current(key_id, quota, now, |c, end| state(quota, c, now, end, None))
    }

    /// Units used by `key_id` in the window containing `now` (0 when none).
    pub fn used(&self, key_id: &str, quota: Quota, now: i64) -> u64 {
        let map = self.counters.read().unwrap_or_else(|p| p.into_inner());
        map.get(key_id).map_or(0, |c| {
            let c = c.lock().unwrap_or_else(|p| p.into_inner());
            if c.period == quota.period && c.window_start == window(quota.period, now).0 {
                c.used
            } else {
                0
            }
        })
    }

    /// Counters for the state file: those of windows still current at `now` (a counter of a
    /// past window means 0 anyway, and keys removed from the config drop out this way).
    pub fn export(&self, now: i64) -> BTreeMap<String, QuotaRecord> {
        let map = self.counters.read().unwrap_or_else(|p| p.into_inner());
        map.iter()
            .map(|(id, c)| (id, *c.lock().unwrap_or_else(|p| p.into_inner())))
            .filter(|(_, r)| r.window_start == window(r.period, now).0)
            .map(|(id, r)| (id.to_string(), r))
            .collect()
    }

    /// Seeds counters from the state file (at start-up).
    pub fn import(&self, records: BTreeMap<String, QuotaRecord>) {
        let mut map = self.counters.write().unwrap_or_else(|p| p.into_inner());
        for (id, r) in records {
            map.insert(id.into_boxed_str(), Arc::new(Mutex::new(r)));
        }
    }

    /// True (and cleared) if anything changed since the last call.
    pub fn take_dirty(&self) -> bool {
        self.dirty.swap(false, Relaxed)
    }

    pub fn mark_dirty(&self) {
        self.dirty.store(true, Relaxed);
    }
}

fn state(quota: Quota, c: &QuotaRecord, now: i64, end: i64, refused: Option<bool>) -> QuotaState {
    QuotaState {
        quota,
        used: c.used,
        remaining: quota.limit.saturating_sub(c.used),
        // Rounded up and at least 1: a client told "0" would retry into the same window.
        reset_secs: u64::try_from(end - now).unwrap_or(0).max(1),
        window_secs: u64::try_from(end - c.window_start).unwrap_or(0),
        refused,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(s: &str) -> i64 {
        s.parse::<jiff::Timestamp>().unwrap().as_second()
    }

    #[test]
    fn parses_quotas() {
        assert_eq!(
            parse_quota("10000/day").unwrap(),
            Quota {
                limit: 10_000,
                period: Period::Day
            }
        );
        assert_eq!(parse_quota("500_000/month").unwrap().limit, 500_000);
        for bad in ["0/day", "10/week", "ten/day", "10", "-1/day", "10/s"] {
            assert!(parse_quota(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn calendar_windows_in_utc() {
        let now = ts("2026-03-15T13:45:00Z");
        assert_eq!(
            window(Period::Day, now),
            (ts("2026-03-15T00:00:00Z"), ts("2026-03-16T00:00:00Z"))
        );
        assert_eq!(
            window(Period::Month, now),
            (ts("2026-03-01T00:00:00Z"), ts("2026-04-01T00:00:00Z"))
        );
        // February of a leap year, December → January, the last second of a day.
        let (s, e) = window(Period::Month, ts("2028-02-29T23:59:59Z"));
        assert_eq!((e - s) / DAY, 29);
        assert_eq!(
            window(Period::Month, ts("2026-12-31T23:59:59Z")).1,
            ts("2027-01-01T00:00:00Z")
        );
        assert_eq!(
            window(Period::Day, ts("2026-03-15T23:59:59Z")).1,
            ts("2026-03-16T00:00:00Z")
        );
        assert_eq!(
            window(Period::Day, ts("2026-03-16T00:00:00Z")).0,
            ts("2026-03-16T00:00:00Z")
        );
    }

    #[test]
    fn counts_refuses_and_resets_at_the_window_edge() {
        let q = parse_quota("3/day").unwrap();
        let l = LocalQuotas::default();
        let t = ts("2026-03-15T23:59:58Z");
        assert_eq!(l.charge("a", q, 2, t).remaining, 1);
        let s = l.charge("a", q, 2, t);
        assert_eq!(s.refused, Some(false), "over: refused, but a unit is left");
        assert_eq!((s.used, s.remaining, s.reset_secs), (2, 1, 2));
        assert_eq!(l.charge("a", q, 1, t).remaining, 0);
        assert_eq!(
            l.charge("a", q, 1, t + 1).refused,
            Some(true),
            "used up: the window's event"
        );
        assert_eq!(
            l.charge("a", q, 1, t + 1).refused,
            Some(false),
            "logged once"
        );
        assert_eq!(l.charge("a", q, 0, t + 1).refused, None, "cost 0 passes");
        let next = l.charge("a", q, 1, t + 2);
        assert_eq!((next.refused, next.used, next.remaining), (None, 1, 2));
        assert_eq!(next.reset_secs, 86_400);
        assert_eq!(l.used("b", q, t), 0);
    }

    #[test]
    fn cost_rules_most_specific_wins() {
        let rule = |m: Option<&[Method]>, p: &str, cost| CostRule {
            methods: m.map(|m| m.to_vec()),
            path: p.into(),
            cost,
        };
        let t = CostTable::new(
            1,
            vec![
                rule(None, "/api", 2),
                rule(Some(&[Method::GET]), "/api/v1/jobs", 0),
                rule(None, "/api/v1/jobs", 5),
                rule(Some(&[Method::POST]), "/api/v1/convert", 10),
            ],
        );
        assert_eq!(t.cost(&Method::GET, "/api/v1/jobs/7", None), 0);
        assert_eq!(t.cost(&Method::DELETE, "/api/v1/jobs/7", None), 5);
        assert_eq!(t.cost(&Method::POST, "/api/v1/convert", None), 10);
        assert_eq!(t.cost(&Method::GET, "/api/v1/convert", None), 2);
        assert_eq!(t.cost(&Method::GET, "/other", None), 1);
        assert_eq!(
            t.cost(&Method::GET, "/api/v1/jobsx", None),
            2,
            "segment-wise"
        );
        // Other spellings of the expensive path cannot buy the cheap rule.
        for sneaky in [
            "/api/v1/jobs/../convert",
            "/api/v1/jobs/%2e%2e/convert",
            "/api/v1/jobs/..%2fconvert",
            "//api/v1/convert",
            "/api/v1/jobs/..\\convert",
            "/api/v1/jobs/..;/convert",
            "/api/v1/jobs/..%3bx/convert",
            "/api/v1/convert;v=2",
            "/api/v1/convert/../jobs/../convert",
            "/api/v1/CONVERT",
            "/API/V1/Convert",
            "/api/v1/jobs/../Convert;x",
            "/api/v1/jobs/%252e%252e/convert",
            "/api/v1/convert/%2500",
        ] {
            assert_eq!(t.cost(&Method::POST, sneaky, None), 10, "{sneaky}");
        }
    }

    /// Fresh user T5-19: HEAD /c cost 1 where GET /c cost 4 (Starlette runs the GET handler
    /// for HEAD). A GET rule prices HEAD, unless HEAD is priced for that path; a `_method`
    /// override costs what its method costs.
    #[test]
    fn no_spelling_of_a_method_is_cheaper_than_the_method() {
        let rule = |m: &[Method], p: &str, cost| CostRule {
            methods: Some(m.to_vec()),
            path: p.into(),
            cost,
        };
        let t = CostTable::new(
            1,
            vec![
                rule(&[Method::GET], "/c", 4),
                rule(&[Method::POST], "/d", 4),
                rule(&[Method::GET], "/poll", 0),
                rule(&[Method::GET], "/e", 6),
                rule(&[Method::HEAD], "/e", 2),
                rule(&[Method::DELETE], "/items", 9),
            ],
        );
        assert_eq!(t.cost(&Method::HEAD, "/c", None), 4);
        assert_eq!(t.cost(&Method::HEAD, "/c/x", None), 4);
        assert_eq!(t.cost(&Method::HEAD, "/C", None), 4, "case as for GET");
        assert_eq!(t.cost(&Method::HEAD, "/x/../c", None), 4);
        assert_eq!(
            t.cost(&Method::HEAD, "/poll", None),
            0,
            "free GET, free HEAD"
        );
        assert_eq!(t.cost(&Method::HEAD, "/e", None), 2, "HEAD priced itself");
        assert_eq!(t.cost(&Method::GET, "/e", None), 6);
        // Other methods stay the operator's business (PUT is not POST).
        assert_eq!(t.cost(&Method::PUT, "/d", None), 1);
        assert_eq!(t.cost(&Method::OPTIONS, "/c", None), 1);
        // Method overrides in the query: the highest of the method and what it names.
        for q in [
            "_method=DELETE",
            "a=1&_method=delete",
            "_METHOD=%44ELETE",
            "_method=%2544ELETE",
            "x=1;_method=+DELETE",
        ] {
            assert_eq!(t.cost(&Method::POST, "/items/1", Some(q)), 9, "{q}");
        }
        assert_eq!(t.cost(&Method::POST, "/c", Some("_method=HEAD")), 4);
        assert_eq!(t.cost(&Method::DELETE, "/items/1", Some("_method=GET")), 9);
        assert_eq!(
            t.cost(&Method::POST, "/items/1", Some("x_method=DELETE")),
            1
        );
        assert_eq!(t.cost(&Method::POST, "/items/1", Some("_method=")), 1);
    }
}
