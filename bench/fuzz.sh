#!/usr/bin/env bash
# Runs every cargo-fuzz target in fuzz/ for a fixed number of executions, one target at a time,
# and prints a table: target / executions / crashes / seconds.
#
#   bench/fuzz.sh                    # 10 000 000 executions per target
#   FUZZ_RUNS=100000 bench/fuzz.sh   # a quick pass
#   bench/fuzz.sh token path         # only these targets
#
# Environment:
#   FUZZ_RUNS       executions per target (default 10000000)
#   FUZZ_RUNS_<t>   executions for target <t> only (e.g. FUZZ_RUNS_config=2000000)
#   FUZZ_SANITIZER  cargo-fuzz sanitizer (default none: keygate forbids unsafe code, and the
#                   throughput matters more here; use `address` to also check dependencies)
#   FUZZ_CORPUS     where the working corpus lives (default: a fresh scratch directory that is
#                   removed afterwards; seeds from fuzz/seeds/<target>/ are copied into it)
#
# Works on stable Rust through RUSTC_BOOTSTRAP=1 (cargo-fuzz needs -Z flags). Crash inputs are
# kept in fuzz/artifacts/<target>/ (git-ignored); reproduce one with
#   RUSTC_BOOTSTRAP=1 cargo fuzz run --sanitizer none <target> fuzz/artifacts/<target>/crash-…
# Exits 1 if any target crashed.
set -euo pipefail
cd "$(dirname "$0")/.."

runs="${FUZZ_RUNS:-10000000}"
sanitizer="${FUZZ_SANITIZER:-none}"
export RUSTC_BOOTSTRAP=1

if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "installing cargo-fuzz" >&2
  cargo install cargo-fuzz --locked >&2
fi

if [ "$#" -gt 0 ]; then
  targets=("$@")
else
  mapfile -t targets < <(cargo fuzz list)
fi

echo "building ${targets[*]} (sanitizer: $sanitizer)" >&2
cargo fuzz build --sanitizer "$sanitizer" >&2
bin_dir="${CARGO_TARGET_DIR:-fuzz/target}/$(rustc -vV | sed -n 's/^host: //p')/release"

scratch=""
if [ -z "${FUZZ_CORPUS:-}" ]; then
  scratch="$(mktemp -d)"
  trap 'rm -rf "$scratch"' EXIT
fi
corpus_root="${FUZZ_CORPUS:-$scratch}"

rows=()
failed=0
for t in "${targets[@]}"; do
  corpus="$corpus_root/$t"
  artifacts="fuzz/artifacts/$t"
  mkdir -p "$corpus" "$artifacts"
  if [ -d "fuzz/seeds/$t" ]; then
    cp -n fuzz/seeds/"$t"/* "$corpus"/ 2>/dev/null || true
  fi
  before=$(find "$artifacts" -type f | wc -l)
  log="$(mktemp)"
  runs_var="FUZZ_RUNS_$t"
  n="${!runs_var:-$runs}"
  echo "== $t: $n executions" >&2
  start=$(date +%s)
  set +e
  "$bin_dir/$t" "$corpus" \
    -runs="$n" \
    -artifact_prefix="$artifacts/" \
    -print_final_stats=1 \
    -timeout=10 \
    -rss_limit_mb=2048 \
    -max_len=8192 \
    >"$log" 2>&1
  rc=$?
  set -e
  secs=$(( $(date +%s) - start ))
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n1)
  crashes=$(( $(find "$artifacts" -type f | wc -l) - before ))
  if [ "$rc" -ne 0 ] && [ "$crashes" -eq 0 ]; then
    crashes=1 # died without writing an artifact (e.g. out of memory)
  fi
  if [ "$crashes" -ne 0 ]; then
    failed=1
    grep -E "panicked at|^SUMMARY|Test unit written" "$log" | head -n 5 >&2 || true
  fi
  rm -f "$log"
  rows+=("$(printf '%-16s %14s %8s %8s' "$t" "${execs:-?}" "$crashes" "$secs")")
done

printf '%-16s %14s %8s %8s\n' target executions crashes seconds
for r in "${rows[@]}"; do
  echo "$r"
done
exit "$failed"
