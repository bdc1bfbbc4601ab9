//! Wall-clock time for quota windows and network history, with one testing-only override.
//!
//! Quotas reset at 00:00 UTC and on the 1st of the month; tests must see that happen without
//! sleeping to a real day boundary. `KEYGATE_TEST_CLOCK_START` (an RFC 3339 instant, e.g.
//! `2026-01-31T23:59:50Z`) makes this clock start at that instant when the process starts and
//! then run at real speed.
//!
//! **Testing only**, and built so that it cannot weaken a production deployment:
//! * it is honoured only by debug builds (`cfg(debug_assertions)`, what `cargo test` runs);
//!   a release build ignores it and logs a warning that it did;
//! * it moves only the quota and network-history clock. Key expiry, certificate expiry and
//!   the state file's last-used times keep using the real clock, so it can never revive an
//!   expired key;
//! * when it is honoured, every start logs a warning saying so.

use std::sync::OnceLock;

/// The environment variable read once at start-up. Testing only (see the module comment).
pub const TEST_CLOCK_ENV: &str = "KEYGATE_TEST_CLOCK_START";

/// Seconds added to the real clock (0 unless the testing override is honoured).
static OFFSET: OnceLock<i64> = OnceLock::new();

/// Reads the override (once; later calls do nothing). Called at start-up by `run`.
pub fn init() {
    OFFSET.get_or_init(offset_from_env);
}

fn offset_from_env() -> i64 {
    let Ok(text) = std::env::var(TEST_CLOCK_ENV) else {
        return 0;
    };
    if !cfg!(debug_assertions) {
        tracing::warn!(
            variable = TEST_CLOCK_ENV,
            "ignored: the quota test clock exists only in debug (test) builds"
        );
        return 0;
    }
    match text.trim().parse::<jiff::Timestamp>() {
        Ok(start) => {
            let offset = start.as_second() - jiff::Timestamp::now().as_second();
            tracing::warn!(
                variable = TEST_CLOCK_ENV,
                start = %start,
                offset_secs = offset,
                "TESTING ONLY: the quota and network-history clock is shifted"
            );
            offset
        }
        Err(_) => {
            tracing::warn!(
                variable = TEST_CLOCK_ENV,
                "ignored: not an RFC 3339 instant"
            );
            0
        }
    }
}

/// Now, in unix seconds, for quota windows and network history.
pub fn now() -> i64 {
    jiff::Timestamp::now().as_second() + OFFSET.get().copied().unwrap_or(0)
}
