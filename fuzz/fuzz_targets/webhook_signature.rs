//! The webhook signature-header parsers and verification (`keygate::webhook::signature`):
//! `parse_hex_tag`, `parse_github`, `parse_unix`, `parse_stripe`, `parse_standard`, `verify`,
//! `sign`, and the delivery-id reader `webhook::json_field`, on arbitrary header values, keys,
//! bodies, ids and clocks.
//!
//! Properties:
//! - nothing panics, whatever the header, key, body or clock (`verify` included, for every
//!   scheme, with the arbitrary value as the signature, id and timestamp header);
//! - `parse_hex_tag` accepts exactly 64 hex digits (surrounding ASCII whitespace ignored), and
//!   the tag re-encodes to them (lower case); `parse_github` is `sha256=` + that;
//! - `parse_unix` accepts exactly 1 to 12 ASCII digits (trimmed) and gives their value;
//! - anything `parse_stripe` accepts has one timestamp equal to `parse_unix` of its text and
//!   1 to `MAX_SIGNATURES` v1 tags, and re-serialised as `t=…,v1=…` parses to the same;
//! - anything `parse_standard` accepts has 1 to `MAX_SIGNATURES` tags, and re-serialised as
//!   `v1,<base64> …` parses to the same;
//! - the headers `sign` builds for any key, body, id and time always parse and verify with that
//!   key at that time (tolerance 0), and a changed body byte, another key or a clock past the
//!   tolerance is refused with the right `Failure`.

#![no_main]

use base64::Engine as _;
use keygate::config::secret::Secret;
use keygate::webhook::signature::{
    Failure, MAX_SIGNATURES, Scheme, Signed, parse_github, parse_hex_tag, parse_standard,
    parse_stripe, parse_unix, sign, verify,
};
use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
struct Input<'a> {
    header: &'a [u8],
    key: Vec<u8>,
    body: &'a [u8],
    id: String,
    /// Unix seconds, within what `parse_unix` reads (12 digits).
    now: u32,
    flip: u16,
    scheme: u8,
}

const SCHEMES: [Scheme; 4] = [
    Scheme::HmacSha256Hex,
    Scheme::Github,
    Scheme::Stripe,
    Scheme::StandardWebhooks,
];

fn parsers(v: &[u8]) {
    let trimmed = v.trim_ascii();
    match parse_hex_tag(v) {
        Some(tag) => {
            assert_eq!(trimmed.len(), 64);
            assert_eq!(hex::encode(tag).as_bytes(), trimmed.to_ascii_lowercase());
        }
        None => assert!(trimmed.len() != 64 || !trimmed.iter().all(u8::is_ascii_hexdigit)),
    }
    match (parse_github(v), trimmed.strip_prefix(b"sha256=")) {
        (Some(tag), Some(rest)) => assert_eq!(parse_hex_tag(rest), Some(tag)),
        (Some(_), None) => panic!("github tag without sha256="),
        (None, Some(rest)) => assert_eq!(parse_hex_tag(rest), None),
        (None, None) => {}
    }
    let digits =
        !trimmed.is_empty() && trimmed.len() <= 12 && trimmed.iter().all(u8::is_ascii_digit);
    match parse_unix(v) {
        Some(n) => {
            assert!(digits);
            assert_eq!(
                n,
                std::str::from_utf8(trimmed)
                    .unwrap()
                    .parse::<i64>()
                    .unwrap()
            );
            assert!(n >= 0);
        }
        None => assert!(!digits),
    }
    if let Some(h) = parse_stripe(v) {
        assert!((1..=MAX_SIGNATURES).contains(&h.v1.len()), "{}", h.v1.len());
        assert_eq!(parse_unix(h.timestamp_text), Some(h.timestamp));
        let mut again = format!("t={}", std::str::from_utf8(h.timestamp_text).unwrap());
        for tag in &h.v1 {
            again.push_str(",v1=");
            again.push_str(&hex::encode(tag));
        }
        let h2 = parse_stripe(again.as_bytes()).expect("re-serialised Stripe header parses");
        assert_eq!((h2.timestamp, &h2.v1), (h.timestamp, &h.v1));
    }
    if let Some(tags) = parse_standard(v) {
        assert!((1..=MAX_SIGNATURES).contains(&tags.len()));
        let again: Vec<String> = tags
            .iter()
            .map(|t| format!("v1,{}", base64::engine::general_purpose::STANDARD.encode(t)))
            .collect();
        assert_eq!(parse_standard(again.join(" ").as_bytes()), Some(tags));
    }
}

fuzz_target!(|input: Input<'_>| {
    parsers(input.header);
    let _ = keygate::webhook::json_field(input.body, "id");

    let scheme = SCHEMES[usize::from(input.scheme) % SCHEMES.len()];
    let key = Secret::new(input.key.clone());
    let keys = std::slice::from_ref(&key);
    let now = i64::from(input.now);

    // Arbitrary header values in every position: no panic, and never accepted by chance.
    let d = Signed {
        signature: Some(input.header),
        id: Some(input.header),
        timestamp: Some(input.header),
        body: input.body,
    };
    for s in SCHEMES {
        let _ = verify(s, keys, &d, now, 300);
    }

    // What `sign` builds verifies, with that key at that time.
    let id = input.id.replace(|c: char| c.is_control(), "");
    let header = scheme.default_header();
    let headers = sign(scheme, header, &key, input.body, now, &id);
    let get = |name: &str| {
        headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_bytes())
    };
    let signed = Signed {
        signature: get(header),
        id: get("webhook-id"),
        timestamp: get("webhook-timestamp"),
        body: input.body,
    };
    assert!(signed.signature.is_some());
    assert_eq!(
        verify(scheme, keys, &signed, now, 0),
        Ok(()),
        "{scheme:?} {headers:?}"
    );
    match scheme {
        Scheme::HmacSha256Hex => assert!(parse_hex_tag(signed.signature.unwrap()).is_some()),
        Scheme::Github => assert!(parse_github(signed.signature.unwrap()).is_some()),
        Scheme::Stripe => {
            let h = parse_stripe(signed.signature.unwrap()).unwrap();
            assert_eq!((h.timestamp, h.v1.len()), (now, 1));
        }
        Scheme::StandardWebhooks => {
            assert_eq!(
                parse_standard(signed.signature.unwrap()).map(|t| t.len()),
                Some(1)
            );
            assert_eq!(parse_unix(signed.timestamp.unwrap()), Some(now));
        }
    }

    // A changed body byte is a bad signature.
    if !input.body.is_empty() {
        let mut body = input.body.to_vec();
        let i = usize::from(input.flip) % body.len();
        body[i] ^= 1 << (input.flip >> 13);
        let changed = Signed {
            body: &body,
            ..signed
        };
        assert_eq!(
            verify(scheme, keys, &changed, now, 0),
            Err(Failure::BadSignature)
        );
    }
    // Another key is a bad signature (HMAC pads keys with zeros to the block size, so a key
    // that only adds trailing zero bytes is the same key: append a non-zero byte instead).
    let mut other = input.key.clone();
    other.push(1);
    let other = Secret::new(other);
    assert_eq!(
        verify(scheme, std::slice::from_ref(&other), &signed, now, 0),
        Err(Failure::BadSignature)
    );
    // With both keys configured (rotation), it verifies.
    assert_eq!(
        verify(scheme, &[other, key.clone()], &signed, now, 0),
        Ok(())
    );
    // Past the tolerance, a timestamped scheme says stale.
    if scheme.is_timestamped() {
        assert_eq!(
            verify(scheme, keys, &signed, now + 301, 300),
            Err(Failure::Stale)
        );
        assert_eq!(verify(scheme, keys, &signed, now + 300, 300), Ok(()));
    }
});
