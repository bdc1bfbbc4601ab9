//! Credential echoes: the client presented its token in the credential header (or
//! `Authorization: Bearer`) and, by mistake or through a library, also somewhere else in the
//! request — a query parameter (`?api_key=…`, any name), a cookie, a `Referer` carrying such a
//! URL. keygate removes the credential headers before forwarding (SPEC §4); this removes every
//! echo too, so the upstream (and its access log: uvicorn logs query strings) never sees the
//! token:
//!
//! * a query parameter whose name or value contains the token (after percent-decoding, `+` as
//!   space) is removed; every other parameter passes byte for byte, in order, even one with the
//!   same name;
//! * a cookie pair (RFC 6265 §4.2.1, `name=value` separated by `;`) containing it is removed,
//!   the other pairs are kept as sent and joined with `"; "`;
//! * any other header whose value contains it is removed whole.
//!
//! The token is a high-entropy secret (SPEC §2), so "contains" cannot match by accident. The path
//! itself is left alone (rewriting it would change which resource is asked for). Nothing is
//! allocated when there is no echo, the usual case.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::PathAndQuery;

/// What to change in a request so that `token` appears nowhere in it.
#[derive(Debug, Default)]
pub struct Echoes {
    /// The path and query without the echoing parameters.
    pub path_and_query: Option<PathAndQuery>,
    /// The `Cookie` value without the echoing pairs (`Some(None)`: no pair left).
    cookie: Option<Option<HeaderValue>>,
    /// Other headers to remove.
    headers: Vec<HeaderName>,
    /// Where echoes were found, for the log: "query", "cookie", "header".
    pub places: Vec<&'static str>,
}

impl Echoes {
    /// Finds the echoes of `token` in the query and in the headers other than the credential
    /// headers (`credential_header`, `Authorization`), which keygate removes anyway.
    /// None when there is none.
    pub fn find(
        token: &str,
        pq: Option<&PathAndQuery>,
        headers: &HeaderMap,
        credential_header: &HeaderName,
    ) -> Option<Echoes> {
        let token = token.as_bytes();
        if token.is_empty() {
            return None;
        }
        let mut found = Echoes::default();
        if let Some(pq) = pq
            && let Some(query) = pq.query()
            && let Some(kept) = without_matching(query, b'&', token)
        {
            let path = pq.path();
            let rebuilt = if kept.is_empty() {
                path.to_string()
            } else {
                format!("{path}?{kept}")
            };
            found.path_and_query = PathAndQuery::try_from(rebuilt).ok();
            found.places.push("query");
        }
        let mut cookie_seen = false;
        for (name, value) in headers {
            if name == credential_header || name == header::AUTHORIZATION {
                continue;
            }
            if name == header::COOKIE {
                cookie_seen = true;
                continue;
            }
            if contains_token(value.as_bytes(), token) && !found.headers.contains(name) {
                found.headers.push(name.clone());
                if !found.places.contains(&"header") {
                    found.places.push("header");
                }
            }
        }
        if cookie_seen {
            // Several Cookie lines (HTTP/2 sends one per pair) are one list (RFC 9113 §8.2.3).
            let values: Vec<&[u8]> = headers
                .get_all(header::COOKIE)
                .iter()
                .map(|v| v.as_bytes())
                .collect();
            if values.iter().any(|v| contains_token(v, token)) {
                let joined = values
                    .iter()
                    .filter_map(|v| std::str::from_utf8(v).ok())
                    .collect::<Vec<_>>()
                    .join("; ");
                let kept = without_matching(&joined, b';', token).unwrap_or(joined);
                found.cookie = Some(
                    HeaderValue::from_str(&kept)
                        .ok()
                        .filter(|_| !kept.is_empty()),
                );
                found.places.push("cookie");
            }
        }
        (!found.places.is_empty()).then_some(found)
    }

    /// Removes the echoing headers and cookie pairs (the path is the caller's to use).
    pub fn apply_to_headers(&self, headers: &mut HeaderMap) {
        for name in &self.headers {
            headers.remove(name);
        }
        if let Some(cookie) = &self.cookie {
            headers.remove(header::COOKIE);
            if let Some(v) = cookie {
                headers.insert(header::COOKIE, v.clone());
            }
        }
    }
}

/// `list` split on `sep`: None if no item contains the token, else the other items, each as it
/// was sent (cookie pairs trimmed of the space after `;`), joined by the separator (`"; "` for
/// cookies).
fn without_matching(list: &str, sep: u8, token: &[u8]) -> Option<String> {
    let items = list.split(sep as char);
    let hit = |item: &str| contains_token(item.as_bytes(), token);
    if !list.split(sep as char).any(hit) {
        return None;
    }
    let joiner = if sep == b';' { "; " } else { "&" };
    let mut kept = String::with_capacity(list.len());
    for item in items {
        let item = if sep == b';' { item.trim() } else { item };
        if item.is_empty() || hit(item) {
            continue;
        }
        if !kept.is_empty() {
            kept.push_str(joiner);
        }
        kept.push_str(item);
    }
    Some(kept)
}

/// Whether `hay` contains `token`, as is or once percent-decoded (`+` read as a space).
fn contains_token(hay: &[u8], token: &[u8]) -> bool {
    let has = |h: &[u8]| h.len() >= token.len() && h.windows(token.len()).any(|w| w == token);
    if has(hay) {
        return true;
    }
    if !hay.contains(&b'%') {
        return false;
    }
    has(&percent_decode(hay))
}

fn percent_decode(s: &[u8]) -> Vec<u8> {
    let hex = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    let mut out = Vec::with_capacity(s.len());
    let mut i = 0;
    while i < s.len() {
        match s[i] {
            b'%' if i + 2 < s.len() => match (hex(s[i + 1]), hex(s[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push(h << 4 | l);
                    i += 3;
                    continue;
                }
                _ => out.push(b'%'),
            },
            b'+' => out.push(b' '),
            c => out.push(c),
        }
        i += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOKEN: &str = "kg_ci_0123456789abcdefghijABCDEFGHIJ0123";

    fn find_in(pq: &str, headers: &[(&str, &str)]) -> Option<Echoes> {
        let mut h = HeaderMap::new();
        for (n, v) in headers {
            h.append(
                HeaderName::from_bytes(n.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        let pq = PathAndQuery::try_from(pq).unwrap();
        Echoes::find(TOKEN, Some(&pq), &h, &HeaderName::from_static("x-api-key"))
    }

    #[test]
    fn query_parameters_carrying_the_token_are_removed_and_the_rest_kept_byte_for_byte() {
        let t = TOKEN;
        let encoded = t.replace('_', "%5F");
        for (query, kept) in [
            (format!("api_key={t}"), "/p".to_string()),
            (
                format!("a=1&api_key={t}&b=%20x+y"),
                "/p?a=1&b=%20x+y".to_string(),
            ),
            (format!("x={t}&x=other&x="), "/p?x=other&x=".to_string()),
            (
                format!("anything={encoded}&keep=1"),
                "/p?keep=1".to_string(),
            ),
            (
                format!("auth=Bearer+{t}&k=%E2%82%AC"),
                "/p?k=%E2%82%AC".to_string(),
            ),
            (format!("{t}&z=1"), "/p?z=1".to_string()),
        ] {
            let e = find_in(&format!("/p?{query}"), &[]).expect(&query);
            assert_eq!(e.path_and_query.unwrap().as_str(), kept, "{query}");
            assert_eq!(e.places, vec!["query"]);
        }
        assert!(find_in("/p?api_key=kg_ci_other&a=1", &[]).is_none());
        assert!(find_in("/p", &[]).is_none());
    }

    #[test]
    fn cookie_pairs_and_other_headers_carrying_the_token_are_removed() {
        let e = find_in(
            "/p",
            &[
                ("cookie", &format!("session=abc; token={TOKEN}; lang=en")),
                ("cookie", "theme=dark"),
                ("referer", &format!("https://app/?api_key={TOKEN}")),
                ("x-other", "fine"),
            ],
        )
        .unwrap();
        let mut h = HeaderMap::new();
        h.insert("cookie", HeaderValue::from_static("x"));
        h.insert("referer", HeaderValue::from_static("x"));
        h.insert("x-other", HeaderValue::from_static("fine"));
        e.apply_to_headers(&mut h);
        assert_eq!(h.get("cookie").unwrap(), "session=abc; lang=en; theme=dark");
        assert!(h.get("referer").is_none());
        assert_eq!(h.get("x-other").unwrap(), "fine");
        assert!(e.path_and_query.is_none());

        let e = find_in("/p", &[("cookie", &format!("t={TOKEN}"))]).unwrap();
        let mut h = HeaderMap::new();
        h.insert("cookie", HeaderValue::from_static("x"));
        e.apply_to_headers(&mut h);
        assert!(h.get("cookie").is_none());
        // The credential headers themselves are not echoes (removed elsewhere).
        assert!(
            find_in(
                "/p",
                &[
                    ("x-api-key", TOKEN),
                    ("authorization", &format!("Bearer {TOKEN}"))
                ]
            )
            .is_none()
        );
    }

    #[test]
    fn percent_decoding_is_total() {
        assert_eq!(percent_decode(b"a%41%4"), b"aA%4");
        assert_eq!(percent_decode(b"%zz+%"), b"%zz %");
    }
}
