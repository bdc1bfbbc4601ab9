//! One webhook verification of a 64 KiB body per scheme, as `webhook::deliver` runs it once the
//! body is read: header parse → HMAC-SHA256 over the raw body (and the scheme's prefix) with
//! each configured secret → constant-time compare → timestamp check. One secret per route, and
//! two (rotation: the second one matches, so both MACs are computed). Also the delivery-id read
//! from a JSON body (`id_from = { json = … }`, Stripe's default) over the same 64 KiB.
//!
//! `cargo bench --bench webhook`. Figures: docs/webhooks.md ("Cost").

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use keygate::config::secret::Secret;
use keygate::webhook::signature::{Scheme, Signed, sign, verify};

const BODY_BYTES: usize = 64 * 1024;

fn body() -> Vec<u8> {
    // A JSON object of 64 KiB: the delivery id first, then filler.
    let mut b = br#"{"id":"evt_1NqT9s2eZvKYlo2C","data":""#.to_vec();
    while b.len() < BODY_BYTES - 2 {
        b.extend_from_slice(b"abcdefghijklmnopqrstuvwxyz0123456789");
    }
    b.truncate(BODY_BYTES - 2);
    b.extend_from_slice(b"\"}");
    assert_eq!(b.len(), BODY_BYTES);
    b
}

fn bench(c: &mut Criterion) {
    let body = body();
    let now = 1_700_000_000i64;
    let key = Secret::new(b"whsec_0123456789abcdef0123456789abcdef".to_vec());
    let old = Secret::new(b"whsec_retired-secret-still-configured".to_vec());
    let mut g = c.benchmark_group("webhook_verify_64KiB");
    g.throughput(Throughput::Bytes(BODY_BYTES as u64));
    for scheme in [
        Scheme::HmacSha256Hex,
        Scheme::Github,
        Scheme::Stripe,
        Scheme::StandardWebhooks,
    ] {
        let header = scheme.default_header();
        let headers = sign(
            scheme,
            header,
            &key,
            &body,
            now,
            "msg_2KWPBgLlAfxdpx2AI54pPJ85f4W",
        );
        let get = |name: &str| {
            headers
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| v.as_bytes())
        };
        let d = Signed {
            signature: get(header),
            id: get("webhook-id"),
            timestamp: get("webhook-timestamp"),
            body: &body,
        };
        let one = [key.clone()];
        let two = [old.clone(), key.clone()];
        assert_eq!(verify(scheme, &one, &d, now, 300), Ok(()));
        assert_eq!(verify(scheme, &two, &d, now, 300), Ok(()));
        g.bench_function(format!("{}/1_secret", scheme.as_str()), |b| {
            b.iter(|| verify(scheme, black_box(&one), black_box(&d), now, 300))
        });
        g.bench_function(format!("{}/2_secrets", scheme.as_str()), |b| {
            b.iter(|| verify(scheme, black_box(&two), black_box(&d), now, 300))
        });
    }
    g.bench_function("json_delivery_id", |b| {
        b.iter(|| keygate::webhook::json_field(black_box(&body), "id"))
    });
    g.finish();
}

criterion_group! {
    name = benches;
    // Bounded: a shared machine (COMMON.md); a few seconds per case.
    config = Criterion::default().sample_size(30).warm_up_time(std::time::Duration::from_millis(500)).measurement_time(std::time::Duration::from_secs(2));
    targets = bench
}
criterion_main!(benches);
