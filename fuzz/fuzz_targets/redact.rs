//! `redact_query` with the built-in list of sensitive parameter names.
//!
//! Each input puts one known secret value behind one sensitive name (from the built-in list,
//! in any letter case, percent-encoded in part, with `+`/`%20` padding or a `[]` suffix) among
//! arbitrary other parameters. Properties:
//! - the secret never appears in the output;
//! - the output has the same `&`-separated pairs in the same order, the sensitive one as
//!   `<name as sent>=REDACTED`;
//! - every pair whose name is not sensitive (by an independent reading of the rule) is unchanged,
//!   unless it holds something token-shaped (`keygate::log::holds_token`, unit-tested in
//!   `src/log.rs`) or a nested query with a sensitive name (`next=/cb?code=…`, percent-encoded
//!   up to three times): then it is `<name>=REDACTED`, or `REDACTED` when the name holds it.

#![no_main]

use keygate::config::BUILTIN_REDACTED_PARAMS;
use keygate::log::redact_query;
use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
struct Input {
    path: String,
    name: u8,
    /// Bit i: upper-case char i; bit 16+i: percent-encode char i.
    mangle: u32,
    pad: u8,
    array: bool,
    secret: Vec<u8>,
    value_prefix: String,
    value_suffix: String,
    position: u8,
    others: Vec<(String, Option<String>)>,
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && i + 2 < b.len()
            && b[i + 1].is_ascii_hexdigit()
            && b[i + 2].is_ascii_hexdigit()
        {
            out.push(u8::from_str_radix(&s[i + 1..i + 3], 16).unwrap());
            i += 3;
        } else if b[i] == b'+' {
            out.push(b' ');
            i += 1;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The rule as the SPEC and the module docs state it, written independently.
fn oracle_sensitive(name: &str) -> bool {
    let d = percent_decode(name);
    let d = d.trim();
    let base = match d.find('[') {
        Some(i) => &d[..i],
        None => d,
    };
    if BUILTIN_REDACTED_PARAMS
        .iter()
        .any(|p| p.eq_ignore_ascii_case(base) || p.eq_ignore_ascii_case(d))
    {
        return true;
    }
    // Secret-bearing names (keygate::log::secret_bearing_name), on the whole name and on each
    // part between brackets.
    std::iter::once(d)
        .chain(d.split(['[', ']']))
        .any(secret_bearing)
}

/// The first 64 ASCII letters and digits, lowercased: one of the short names, ending in `key`,
/// or holding a fragment.
fn secret_bearing(name: &str) -> bool {
    let norm: String = name
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .take(64)
        .collect::<String>()
        .to_ascii_lowercase();
    [
        "key", "sig", "code", "pass", "auth", "pw", "psw", "pin", "sid", "pat",
    ]
    .contains(&norm.as_str())
        || norm.ends_with("key")
        || [
            "token",
            "secret",
            "passw",
            "pwd",
            "signature",
            "apikey",
            "credential",
            "assertion",
            "session",
            "sessid",
            "privatekey",
            "cookie",
            "jwt",
            "hmac",
            "authoriz",
            "passphrase",
            "passcode",
            "userpass",
            "bearer",
            "cred",
            "saml",
            "verifier",
            "ticket",
            "authcode",
            "otp",
            "mfa",
            "githubpat",
        ]
        .iter()
        .any(|f| norm.contains(f))
}

/// A value that carries a query of its own (`next=/cb?code=…`, percent-encoded up to three
/// times) with a sensitive name in it is redacted whole.
fn oracle_nested(v: &str) -> bool {
    let carries = |s: &str| {
        s.split(['?', '&', ';']).any(|piece| match piece.split_once('=') {
            Some((n, _)) => !n.trim().is_empty() && oracle_sensitive(n),
            None => false,
        })
    };
    let mut s = v.to_string();
    for _ in 0..4 {
        if carries(&s) {
            return true;
        }
        let next = percent_decode(&s);
        if next == s {
            break;
        }
        s = next;
    }
    false
}

fuzz_target!(|input: Input| {
    let params: Vec<String> = BUILTIN_REDACTED_PARAMS
        .iter()
        .map(|s| s.to_string())
        .collect();

    // The secret: 12–40 alphanumerics, so it can only ever occur where it was put.
    const ALNUM: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
    let secret: String = input
        .secret
        .iter()
        .take(40)
        .map(|&b| ALNUM[usize::from(b) % ALNUM.len()] as char)
        .collect();
    if secret.len() < 12 {
        return;
    }

    let base = BUILTIN_REDACTED_PARAMS[usize::from(input.name) % BUILTIN_REDACTED_PARAMS.len()];
    let mut name = String::new();
    match input.pad % 4 {
        1 => name.push('+'),
        2 => name.push_str("%20"),
        _ => {}
    }
    for (i, c) in base.chars().enumerate() {
        let c = if input.mangle & (1 << (i % 16)) != 0 {
            c.to_ascii_uppercase()
        } else {
            c
        };
        if input.mangle & (1 << (16 + i % 16)) != 0 {
            name.push_str(&format!("%{:02X}", c as u32));
        } else {
            name.push(c);
        }
    }
    if input.array {
        name.push_str("[]");
    }
    if input.pad % 4 == 3 {
        name.push('+');
    }
    assert!(
        oracle_sensitive(&name),
        "harness built a non-sensitive name {name:?}"
    );
    // No separators inside names and values (`;` separates pairs too: unit-tested in src/log.rs).
    let clean = |s: &str| s.replace(['&', '#', ';'], "");
    let value = format!(
        "{}{secret}{}",
        clean(&input.value_prefix),
        clean(&input.value_suffix)
    );
    let sensitive_pair = format!("{name}={value}");

    let mut pairs: Vec<String> = input
        .others
        .iter()
        .take(12)
        .map(|(n, v)| {
            let n = clean(n).replace('=', "");
            match v {
                Some(v) => format!("{n}={}", clean(v)),
                None => n,
            }
        })
        .collect();
    let at = usize::from(input.position) % (pairs.len() + 1);
    pairs.insert(at, sensitive_pair);
    let path = clean(&input.path).replace('?', "");
    let path = if path.starts_with('/') {
        path
    } else {
        format!("/{path}")
    };
    let pq = format!("{path}?{}", pairs.join("&"));
    if pq.matches(secret.as_str()).count() != 1 {
        return; // the secret also occurs by chance elsewhere: not a meaningful input
    }

    let out = redact_query(&pq, &params);
    assert!(!out.contains(&secret), "secret survives: {pq:?} -> {out:?}");

    let (out_path, out_query) = out.split_once('?').expect("the query stays");
    if !keygate::log::holds_token(&path) {
        assert_eq!(out_path, path);
    }
    let out_pairs: Vec<&str> = out_query.split('&').collect();
    assert_eq!(out_pairs.len(), pairs.len(), "{pq:?} -> {out:?}");
    for (i, (inp, outp)) in pairs.iter().zip(&out_pairs).enumerate() {
        let (n, v) = match inp.split_once('=') {
            Some((n, v)) => (n, Some(v)),
            None => (inp.as_str(), None),
        };
        if keygate::log::holds_token(n) {
            assert_eq!(*outp, "REDACTED", "{pq:?} -> {out:?}");
        } else if i == at {
            assert_eq!(*outp, format!("{name}=REDACTED"));
        } else if v.is_some_and(|v| {
            oracle_sensitive(n) || keygate::log::holds_token(v) || oracle_nested(v)
        }) {
            assert_eq!(*outp, format!("{n}=REDACTED"), "{pq:?} -> {out:?}");
        } else {
            assert_eq!(outp, inp, "non-sensitive pair changed: {pq:?} -> {out:?}");
        }
    }
});
