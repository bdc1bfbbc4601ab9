//! The admin listener seen from a test: plain HTTP/1.1 over a fresh TCP connection per request
//! (`Connection: close`, read to EOF), and lookups in the Prometheus text it serves.

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::Keygate;

/// GET `path` on the admin listener: the whole response as text (status line, head, body).
pub async fn admin_get(kg: &Keygate, path: &str) -> String {
    let mut s = tokio::net::TcpStream::connect(kg.admin.expect("admin listener"))
        .await
        .unwrap();
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).await.unwrap();
    raw
}

/// GET `path` on the admin listener: (status, content type, body).
pub async fn admin_parts(kg: &Keygate, path: &str) -> (u16, String, String) {
    let raw = admin_get(kg, path).await;
    let (head, body) = raw.split_once("\r\n\r\n").expect("HTTP response");
    let status = head[9..12].parse().unwrap();
    let ctype = head
        .lines()
        .find_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.eq_ignore_ascii_case("content-type")
                .then(|| v.trim().to_string())
        })
        .unwrap_or_default();
    (status, ctype, body.to_string())
}

/// `/metrics` from the admin listener, over plain HTTP/1.1: the body only.
pub async fn metrics(kg: &Keygate) -> String {
    admin_get(kg, "/metrics")
        .await
        .split_once("\r\n\r\n")
        .expect("HTTP response")
        .1
        .to_string()
}

/// The value of one series (`name` or `name{labels}`, written as exported), `None` when the
/// text has no such series.
pub fn series_value<T: std::str::FromStr>(text: &str, series: &str) -> Option<T> {
    text.lines().find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

/// The value of one series (`name{labels}`) as a whole number, 0 when it is absent (a counter
/// nobody has moved yet is not exported).
pub fn metric(text: &str, series: &str) -> u64 {
    series_value(text, series).unwrap_or(0)
}

/// The value of one series (`name{labels}`) as a float (gauges, timestamps in seconds), 0 when
/// it is absent.
pub fn metric_f64(text: &str, series: &str) -> f64 {
    series_value(text, series).unwrap_or(0.0)
}

/// The value of one series (`name{labels}`) as a whole number; panics when it is absent, for
/// tests that also assert keygate exports it.
pub fn metric_present(text: &str, series: &str) -> u64 {
    series_value(text, series).unwrap_or_else(|| panic!("no {series} in:\n{text}"))
}
