//! Sane ranges for every duration in the config. A value outside its range is an error naming
//! the TOML path: an hour-long `header_read_timeout` would silently disable the slowloris guard,
//! a zero one would refuse every client.

use std::time::Duration;

const MS: u64 = 1;
const S: u64 = 1000 * MS;
const MIN: u64 = 60 * S;
const H: u64 = 60 * MIN;
const D: u64 = 24 * H;

/// (TOML path, lowest, highest) in milliseconds, both inclusive.
const BOUNDS: &[(&str, u64, u64)] = &[
    // Must fit a slow mobile client's request head, and stay short enough to guard against
    // slowloris (SPEC §5).
    ("server.header_read_timeout", 100 * MS, 5 * MIN),
    ("server.tls_handshake_timeout", 100 * MS, 5 * MIN),
    // A client between two body bytes: a slow mobile link pauses for seconds, not for hours.
    ("server.body_read_timeout", S, H),
    ("server.idle_timeout", S, H),
    // Between two writes that the client took (nginx's send_timeout); tests use seconds.
    ("server.send_timeout", S, H),
    // A tunnel where nothing moves either way; a day for applications that never ping.
    ("upstream.tunnel_idle_timeout", S, D),
    // Under systemd, TimeoutStopSec (45 s in the shipped unit) must exceed it.
    ("server.shutdown_grace", 100 * MS, H),
    ("upstream.connect_timeout", 100 * MS, 5 * MIN),
    // Until response headers: a model service may think for minutes, not for hours.
    ("upstream.request_timeout", 100 * MS, H),
    // Must stay below the upstream's keep-alive (gunicorn 2 s, uvicorn 5 s); minutes would
    // only keep connections the upstream has long closed.
    ("upstream.pool_idle_timeout", 100 * MS, 5 * MIN),
    ("state.rotation_period", D, 3650 * D),
    // How long a key's client networks are remembered (`key_new_network`).
    ("key_networks.remember", H, 3650 * D),
];

/// For a duration not listed above (a new setting): more than zero, at most a day.
const OTHER: (u64, u64) = (MS, D);

/// The allowed range of the duration at `path`.
pub fn bounds(path: &str) -> (Duration, Duration) {
    let (lo, hi) = BOUNDS
        .iter()
        .find(|(p, _, _)| *p == path)
        .map_or(OTHER, |(_, lo, hi)| (*lo, *hi));
    (Duration::from_millis(lo), Duration::from_millis(hi))
}

/// `Err` names the range and repeats the value as written (a duration is never secret).
pub fn check(path: &str, written: &str, d: Duration) -> Result<Duration, String> {
    let (lo, hi) = bounds(path);
    if d < lo || d > hi {
        return Err(format!(
            "{:?} is outside the allowed range {} to {}",
            written.trim(),
            humantime::format_duration(lo),
            humantime::format_duration(hi)
        ));
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_listed_default_is_inside_its_range() {
        for (path, default) in [
            ("server.header_read_timeout", "10s"),
            ("server.tls_handshake_timeout", "10s"),
            ("server.body_read_timeout", "60s"),
            ("server.idle_timeout", "60s"),
            ("server.send_timeout", "60s"),
            ("upstream.tunnel_idle_timeout", "60s"),
            ("server.shutdown_grace", "30s"),
            ("upstream.connect_timeout", "5s"),
            ("upstream.request_timeout", "60s"),
            ("upstream.pool_idle_timeout", "1s"),
            ("state.rotation_period", "90d"),
        ] {
            let d = humantime::parse_duration(default).unwrap();
            assert!(check(path, default, d).is_ok(), "{path}");
        }
    }

    #[test]
    fn a_year_long_slowloris_guard_is_refused() {
        let e = check(
            "server.header_read_timeout",
            "1y",
            humantime::parse_duration("1y").unwrap(),
        )
        .unwrap_err();
        assert_eq!(e, "\"1y\" is outside the allowed range 100ms to 5m");
        assert!(check("some.new_timeout", "2d", Duration::from_secs(2 * 86_400)).is_err());
        assert!(check("some.new_timeout", "1ms", Duration::from_millis(1)).is_ok());
    }
}
