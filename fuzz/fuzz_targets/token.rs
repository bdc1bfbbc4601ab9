//! `Token::parse` on arbitrary bytes, and `NewToken::generate` on arbitrary ids.
//!
//! Properties:
//! - the parser agrees with an independent reading of SPEC §2 (accepts exactly the strings of the
//!   form `kg_<id>_<secret><check>` whose check digits are right);
//! - an accepted token re-serialises from its parts to the same string, its id satisfies
//!   `is_valid_id`, and recomputing `check_digits(crc32(prefix))` gives its last 6 characters;
//! - `Debug` of an accepted token never shows the secret;
//! - every generated token parses back, with the id it was made for.

#![no_main]

use keygate::auth::token::{CHECK_LEN, MAX_ID_LEN, SECRET_LEN, check_digits, is_valid_id};
use keygate::auth::{NewToken, Token};
use libfuzzer_sys::fuzz_target;

/// SPEC §2 read independently of `token.rs`.
fn spec_accepts(s: &str) -> bool {
    let parts: Vec<&str> = s.split('_').collect();
    let [kg, id, rest] = parts[..] else {
        return false;
    };
    let id_ok = (1..=MAX_ID_LEN).contains(&id.len())
        && id
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    if kg != "kg" || !id_ok || rest.len() != SECRET_LEN + CHECK_LEN {
        return false;
    }
    if !rest.chars().all(|c| c.is_ascii_alphanumeric()) {
        return false;
    }
    let body = &s[..s.len() - CHECK_LEN];
    let mut crc = crc32fast::hash(body.as_bytes());
    let mut digits = Vec::new();
    for _ in 0..CHECK_LEN {
        let d = (crc % 62) as u8;
        digits.push(match d {
            0..=9 => b'0' + d,
            10..=35 => b'A' + d - 10,
            _ => b'a' + d - 36,
        });
        crc /= 62;
    }
    digits.reverse();
    digits == s.as_bytes()[s.len() - CHECK_LEN..]
}

fuzz_target!(|data: &[u8]| {
    // Header values reach the parser only as `&str`.
    if let Ok(s) = std::str::from_utf8(data) {
        let parsed = Token::parse(s);
        assert_eq!(
            parsed.is_ok(),
            spec_accepts(s),
            "parser and SPEC disagree on {s:?}"
        );
        if let Ok(t) = parsed {
            let id = t.id();
            assert!(is_valid_id(id), "{id:?}");
            let secret_at = 3 + id.len() + 1;
            let secret = &s[secret_at..secret_at + SECRET_LEN];
            let check = &s[secret_at + SECRET_LEN..];
            assert_eq!(format!("kg_{id}_{secret}{check}"), s);
            assert_eq!(t.expose(), s.as_bytes());
            let recomputed = check_digits(crc32fast::hash(&s.as_bytes()[..secret_at + SECRET_LEN]));
            assert_eq!(&recomputed[..], check.as_bytes());
            assert!(!format!("{t:?}").contains(secret), "Debug leaks the secret");
        }
    }

    // Generation: map the input onto a valid id and check the token round-trips. Only for one
    // input in eight: it costs a getrandom call, and the parse half is what needs the volume.
    if data.first().is_none_or(|b| b & 7 != 0) {
        return;
    }
    const ID_CHARS: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789-";
    let id: String = data
        .iter()
        .take(MAX_ID_LEN)
        .map(|b| ID_CHARS[usize::from(*b) % ID_CHARS.len()] as char)
        .collect();
    if is_valid_id(&id) {
        let new = NewToken::generate(&id);
        let t = Token::parse(new.reveal()).expect("a generated token must parse");
        assert_eq!(t.id(), id);
        assert!(spec_accepts(new.reveal()));
        assert!(!format!("{new:?}").contains(&new.reveal()[3 + id.len() + 1..]));
    }
});
