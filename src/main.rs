use clap::Parser;

/// jemalloc, with a background thread that gives freed memory back to the system (settings in
/// `.cargo/config.toml`). With glibc's malloc, memory freed after a burst mostly stays with the
/// process: 1,000 slow readers of a 1 MiB response took keygate from 29 to 132 MiB, and 30 s
/// after they left it still held 64 MiB (glibc only returns the top of its heap, and the
/// connections' buffers fragment it). With jemalloc it is back to ~14 MiB within those 30 s
/// (`bench/attack.sh`, issue 9 §3). The cost is ~1.2 MiB more resident at start (jemalloc's
/// code and static tables: ~10.2 MiB idle instead of ~8.9). mimalloc was measured too and
/// rejected: idle RSS 17.9 MiB.
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> std::process::ExitCode {
    keygate::cli::main(keygate::cli::Cli::parse())
}
