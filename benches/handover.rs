//! The hand-over of one Redis command to the side runtime (src/side_runtime.rs, fresh user
//! T5-17): a request's task on a worker (a current-thread runtime, as each `[server] workers`
//! thread is) spawns the command on the side runtime and awaits its `JoinHandle`. Measured
//! here with an empty command, so the figure is the round trip alone (task allocation, the
//! side thread woken, the worker woken back), against awaiting the same future in place.
//!
//! `cargo bench --bench handover`. Figures: docs/cluster.md ("Cost").

use criterion::{Criterion, criterion_group, criterion_main};

fn bench(c: &mut Criterion) {
    let worker = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut g = c.benchmark_group("redis_command_handover");
    g.bench_function("in_place", |b| {
        b.iter(|| worker.block_on(async { std::hint::black_box(1u64) }))
    });
    g.bench_function("side_runtime_round_trip", |b| {
        b.iter(|| {
            worker.block_on(keygate::side_runtime::run(async {
                std::hint::black_box(1u64)
            }))
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
