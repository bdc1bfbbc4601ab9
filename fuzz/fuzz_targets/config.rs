//! Config loading and validation: `raw_from_str` on arbitrary UTF-8, then `build` with a fixed
//! in-memory certificate (so the TLS part always has something valid to load).
//!
//! Properties:
//! - neither step panics;
//! - every error has a non-empty message;
//! - no error message, and no warning, contains an argon2id hash from the input: the only
//!   `$argon2id$` allowed in a message is the format hint keygate prints itself.

#![no_main]

use std::path::Path;
use std::sync::OnceLock;

use keygate::config::{BuildContext, TlsSource, build, raw_from_str};
use libfuzzer_sys::fuzz_target;

/// The format hint in `PhcHash::parse`'s error: text keygate writes, not input it echoes.
const HINT: &str = "$argon2id$v=19$m=…,t=…,p=…$salt$hash";

fn cert() -> &'static (Vec<u8>, Vec<u8>) {
    static CERT: OnceLock<(Vec<u8>, Vec<u8>)> = OnceLock::new();
    CERT.get_or_init(|| {
        let ck = rcgen::generate_simple_self_signed(vec!["localhost".into()]).expect("rcgen");
        (
            ck.cert.pem().into_bytes(),
            ck.signing_key.serialize_pem().into_bytes(),
        )
    })
}

fn assert_no_hash(input: &str, what: &str, text: &str) {
    if input.contains("$argon2id$") {
        assert!(
            !text.replace(HINT, "").contains("$argon2id$"),
            "{what} echoes a hash from the input: {text:?}"
        );
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let raw = match raw_from_str(text) {
        Ok(raw) => raw,
        Err(errs) => {
            assert!(!errs.0.is_empty());
            for e in &errs.0 {
                assert!(
                    !e.message.trim().is_empty(),
                    "empty message at {:?}",
                    e.path
                );
                assert_no_hash(text, "parse error", &e.to_string());
            }
            return;
        }
    };
    // `build` reads the CA files the config names; keep the fuzzer away from device files that
    // never end or block (/dev/zero, /dev/stdin, /proc/…): that is not a parser property.
    let base = Path::new("/nonexistent-keygate-fuzz");
    let readable = [
        raw.tls.as_ref().and_then(|t| t.client_ca.as_deref()),
        raw.upstream.ca.as_deref(),
    ];
    for p in readable.into_iter().flatten() {
        if let Ok(meta) = std::fs::metadata(base.join(p)) {
            if !meta.is_file() || meta.len() > 1 << 20 || base.join(p).starts_with("/proc") {
                return;
            }
        }
    }
    let (cert, key) = cert();
    let ctx = BuildContext {
        base_dir: base.into(),
        tls_override: Some(TlsSource::Pem {
            cert: cert.clone(),
            key: key.clone(),
        }),
        previous: None,
        in_flight: None,
        delivery_stores: None,
    };
    match build(raw, &ctx) {
        Ok(snapshot) => {
            for w in &snapshot.warnings {
                assert!(!w.trim().is_empty());
                assert_no_hash(text, "warning", w);
            }
        }
        Err(errs) => {
            assert!(!errs.0.is_empty());
            for e in &errs.0 {
                assert!(
                    !e.message.trim().is_empty(),
                    "empty message at {:?}",
                    e.path
                );
                assert_no_hash(text, "build error", &e.to_string());
            }
        }
    }
});
