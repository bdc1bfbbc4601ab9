//! `normalize_path` and `Scope::permits` on arbitrary paths.
//!
//! Properties (for every input that normalises):
//! - the result starts with `/`, has no `.`/`..` segment, no `//`, no `\` and no NUL;
//! - normalising is idempotent: `normalize(normalize(p)) == normalize(p)`, so a scope decision
//!   cannot change if something downstream normalises again;
//! - a scope with prefix `/v1/` never permits a path that any reading (RFC 3986, path
//!   parameters dropped as servlet containers do, or literal) puts outside `/v1/`, and `/v1`
//!   permits only `/v1` itself and what lies below `/v1/`, under every reading;
//! - every idempotent reading is a fixed point of itself; a reading under which the path does
//!   not decode makes every path-scoped key refuse it.
//!
//! The first input byte picks raw UTF-8 or a path assembled from the pieces that matter
//! (dot-segments, encoded dots and slashes, backslashes, double encoding), which libFuzzer
//! would otherwise need a long time to combine.

#![no_main]

use http::Method;
use keygate::access::{PathReading, Scope, normalize_path, read_path};
use libfuzzer_sys::fuzz_target;

const PIECES: &[&str] = &[
    "/", "//", ".", "..", "%2e", "%2E", "%2e%2e", "%2f", "%2F", "%5c", "%5C", "\\", "v1", "v1/",
    "admin", "%25", "%252e", "%252f", "%", "%00", "%zz", "%c3%a9", "é", "a", ";", "?", "%3f", "%2",
    "v1%2f", "/v1", "/v1/", "/..", "/.", "./", "../", "..;", "%3b", ";x=1", "..%3b", "%252e", "%255c", "%2500",
];

fn check(raw: &str) {
    let Some(norm) = normalize_path(raw) else {
        // Unnormalisable paths are refused by every path-scoped key.
        assert!(!Scope::new(None, Some(vec!["/".into()])).permits(&Method::GET, raw));
        return;
    };
    let norm: &str = &norm;
    assert!(norm.starts_with('/'), "{raw:?} -> {norm:?}");
    assert!(!norm.contains("//"), "{raw:?} -> {norm:?}");
    assert!(
        !norm.contains('\\') && !norm.contains('\0'),
        "{raw:?} -> {norm:?}"
    );
    for seg in norm.split('/') {
        assert!(seg != "." && seg != "..", "{raw:?} -> {norm:?}");
    }
    let again = normalize_path(norm).expect("a normalised path normalises again");
    assert_eq!(&*again, norm, "not idempotent for {raw:?}");

    let v1_dir = Scope::new(None, Some(vec!["/v1/".into()]));
    let v1 = Scope::new(None, Some(vec!["/v1".into()]));
    let (dir_ok, exact_ok) = (
        v1_dir.permits(&Method::GET, raw),
        v1.permits(&Method::GET, raw),
    );
    for reading in PathReading::ALL {
        // A reading under which the path does not decode (e.g. `%2500` decoded twice is NUL)
        // must make every path-scoped key refuse it.
        let Some(read) = read_path(raw, reading) else {
            assert!(!dir_ok && !exact_ok, "{raw:?} permitted, undecodable as {reading:?}");
            continue;
        };
        if reading.is_idempotent() {
            let again = read_path(&read, reading).expect("a read path reads again");
            assert_eq!(again, read, "{reading:?} not a fixed point for {raw:?}");
        }
        if dir_ok {
            assert!(read.starts_with("/v1/"), "/v1/ permits {raw:?}: {reading:?} {read:?}");
        }
        if exact_ok {
            assert!(
                read == "/v1" || read.starts_with("/v1/"),
                "/v1 permits {raw:?}: {reading:?} {read:?}"
            );
        }
    }
    // A method-only scope ignores the path entirely.
    assert!(Scope::new(Some(vec![Method::GET]), None).permits(&Method::GET, raw));
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode & 1 == 0 {
        if let Ok(s) = std::str::from_utf8(rest) {
            check(s);
        }
    } else {
        let raw: String = rest
            .iter()
            .map(|&b| PIECES[usize::from(b) % PIECES.len()])
            .collect();
        check(&raw);
    }
});
