#!/usr/bin/env bash
# Where keygate's CPU goes under small-body load (issue 10: measure before changing).
#
#   bash bench/profile.sh                   # h1 (h2load --h1 -c 50), logs off
#   PROF_PROTO=h2 bash bench/profile.sh     # HTTP/2, -m 10
#   PROF_LOG=info bash bench/profile.sh     # with the JSON access log on (to a file)
#
# Starts its own upstream (nginx, 100-byte body) and keygate (`workers = 1`), with
# perf.sh's configs, and reports for PROF_N requests each:
#   1. CPU µs/request (utime+stime from /proc/PID/stat, as perf.sh)
#   2. syscalls per request, by name (strace -c -f on the keygate process)
#   3. heap allocations per request (perf uprobes on libc malloc/calloc/realloc;
#      with jemalloc or mimalloc linked in, its entry points are probed instead)
#   4. a call-graph profile (perf record), top symbols self, and user space grouped by
#      component (rustls, hyper h1/h2, tokio, keygate, allocator...) self and children, by
#      bench/profile_groups.py. PROF_CALLGRAPH=dwarf (default; keygate has no frame pointers,
#      so `fp` stacks stop at the first Rust frame) or fp; PROF_FREQ samples/s (default 1999).
# Needs perf, strace, nginx, h2load, jq. The numbers in 2 and 3 come from runs under
# tracing (slower), so they are counts, not timings. Output: Markdown on stdout.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PERF_DIR=$ROOT/bench/perf
: "${PROF_N:=50000}"
: "${PROF_PROTO:=h1}"
: "${PROF_LOG:=warn}"
: "${PROF_WORKERS:=1}"
: "${PROF_TARGET:=keygate}"    # or nginx: profile perf.sh's nginx proxy (worker_processes 1) instead
: "${PROF_PORT_BASE:=19000}"
: "${PROF_KEEP:=0}"
: "${PROF_STEPS:=cpu strace alloc perf}"
: "${PROF_CALLGRAPH:=dwarf}"
: "${PROF_FREQ:=1999}"
want() { [[ " $PROF_STEPS " == *" $1 "* ]]; }
: "${CARGO_TARGET_DIR:=$ROOT/target}"
: "${KEYGATE_BIN:=$CARGO_TARGET_DIR/release/keygate}"
UP=$PROF_PORT_BASE
KG=$((PROF_PORT_BASE + 443))
log() { printf '[profile] %s\n' "$*" >&2; }
die() { printf '[profile] ERROR: %s\n' "$*" >&2; exit 1; }
for t in perf strace nginx h2load jq openssl curl; do command -v $t >/dev/null || die "$t missing"; done
[[ -x $KEYGATE_BIN ]] || die "$KEYGATE_BIN missing (cargo build --release)"

WORK=$(mktemp -d /tmp/keygate-profile.XXXXXX)
chmod 711 "$WORK"
PIDS=()
cleanup() {
    local rc=$? p
    trap - EXIT
    for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
    if [[ $PROF_KEEP == 1 ]]; then log "kept $WORK"; else rm -rf "$WORK"; fi
    exit "$rc"
}
trap cleanup EXIT
mkdir -p "$WORK"/{tls,www,upstream/tmp,kg}
chmod 755 "$WORK/www"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout "$WORK/tls/key.pem" \
    -out "$WORK/tls/cert.pem" -days 30 -subj /CN=localhost -addext subjectAltName=IP:127.0.0.1 2>/dev/null
head -c 1048576 /dev/urandom >"$WORK/www/big.bin"
KEYJSON=$("$KEYGATE_BIN" keygen --id bench --json)
TOKEN=$(jq -er .token <<<"$KEYJSON")
HASH=$(jq -er .hash <<<"$KEYJSON")
BODY100=$(printf 'x%.0s' $(seq 99))'\n'
esc() { printf '%s' "$1" | sed -e 's/[\\&#]/\\&/g'; }
render() {
    sed -e "s#@WORK@#$(esc "$WORK")#g" -e "s#@DIR@#$(esc "$3")#g" -e "s#@PORT@#$4#g" \
        -e "s#@WORKERS@#$PROF_WORKERS#g" -e "s#@LEVEL@#$PROF_LOG#g" -e "s#@UPSTREAM_PORT@#$UP#g" \
        -e "s#@HASH@#$(esc "$HASH")#g" -e "s#@BODY100@#$(esc "$BODY100")#g" "$1" >"$2"
}
render "$PERF_DIR/upstream.nginx.conf.in" "$WORK/upstream/nginx.conf" "$WORK/upstream" ""
render "$PERF_DIR/keygate.toml.in" "$WORK/kg/keygate.toml" "$WORK/kg" "$KG"
nginx -e "$WORK/upstream/error.log" -p "$WORK/upstream" -c "$WORK/upstream/nginx.conf" &
PIDS+=($!)
if [[ $PROF_TARGET == nginx ]]; then
    mkdir -p "$WORK/ng/tmp"
    render "$PERF_DIR/proxy.nginx.conf.in" "$WORK/ng/nginx.conf" "$WORK/ng" "$KG"
    sed -i -e "s#@TOKEN@#$(esc "$TOKEN")#g" -e "s#@ACCESS_LOG@#$([[ $PROF_LOG == info ]] && echo "access_log $WORK/ng/access.log keygate;" || echo "access_log off;")#" \
        -e "s#@LISTEN_HTTP2@#http2#" -e "s#@HTTP2_ON@##" "$WORK/ng/nginx.conf"
    nginx -e "$WORK/ng/error.log" -p "$WORK/ng" -c "$WORK/ng/nginx.conf" &
    NG_MASTER=$!
    PIDS+=("$NG_MASTER")
    sleep 0.5
    KG_PID=$(pgrep -P "$NG_MASTER" | head -1)
else
    "$KEYGATE_BIN" run -c "$WORK/kg/keygate.toml" >"$WORK/kg/out.log" 2>&1 &
    KG_PID=$!
    PIDS+=("$KG_PID")
fi
for _ in $(seq 50); do (exec 3<>"/dev/tcp/127.0.0.1/$KG") 2>/dev/null && break; sleep 0.1; done
load() {  # load N
    local m=()
    [[ $PROF_PROTO == h1 ]] && m=(--h1) || m=(-m 10)
    h2load -n "$1" -c 50 "${m[@]}" -H "X-API-Key: $TOKEN" "https://127.0.0.1:$KG/small" >"$WORK/h2load.out" 2>&1
    grep -q "$1 succeeded" "$WORK/h2load.out" || die "load run failed: $(grep -E '^requests' "$WORK/h2load.out")"
}
ticks() { local s; s=$(cat "/proc/$1/stat"); s=${s##*) }; awk '{ print $12 + $13 }' <<<"$s"; }
# The key's first use runs argon2 alone (concurrent first uses from one network get 429).
curl -sk -o /dev/null -H "X-API-Key: $TOKEN" "https://127.0.0.1:$KG/small"
sleep 1.5
load 5000
log "$PROF_TARGET pid $KG_PID, $PROF_PROTO, level $PROF_LOG, $PROF_N requests per step"

echo "# $PROF_TARGET profile: $PROF_PROTO, log level $PROF_LOG, workers $PROF_WORKERS, $PROF_N requests ($(cd "$ROOT" && git rev-parse --short HEAD))"
echo
echo "Load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
echo
# Context switches of all the process's threads: voluntary (blocked, e.g. in epoll_wait or a
# futex) and involuntary (preempted).
ctx() { cat /proc/"$KG_PID"/task/*/status | awk '/^voluntary_ctxt/ { v += $2 } /^nonvoluntary_ctxt/ { n += $2 } END { print v, n }'; }
c0=$(ticks "$KG_PID")
read -r v0 n0 < <(ctx)
load "$PROF_N"
c1=$(ticks "$KG_PID")
read -r v1 n1 < <(ctx)
echo "CPU: $(awk -v t=$((c1 - c0)) -v hz="$(getconf CLK_TCK)" -v n="$PROF_N" 'BEGIN { printf "%.2f", t * 1e6 / hz / n }') µs/request; threads: $(ls /proc/$KG_PID/task | wc -l); context switches per request: $(awk -v v=$((v1 - v0)) -v i=$((n1 - n0)) -v n="$PROF_N" 'BEGIN { printf "%.3f voluntary, %.3f involuntary", v / n, i / n }')"
echo

want strace && {
log "strace -c -f"
strace -c -f -p "$KG_PID" -o "$WORK/strace.txt" &
ST=$!
sleep 1
load "$PROF_N"
kill -INT "$ST"
wait "$ST" 2>/dev/null || true
echo "## Syscalls per request (strace -c -f, $PROF_N requests)"
echo
echo "| syscall | calls | per request |"
echo "| --- | ---: | ---: |"
awk -v n="$PROF_N" '$NF == "total" { printf "| **total** | %d | %.2f |\n", $4, $4 / n; next }
    $1 ~ /^[0-9.]+$/ && NF >= 5 { name = $NF; calls = $4; if (calls > n / 100) printf "| %s | %d | %.2f |\n", name, calls, calls / n }' "$WORK/strace.txt"
echo

}
want alloc && {
log "allocations (uprobes)"
probes=()
SYMS=$(nm "$KEYGATE_BIN" 2>/dev/null || true)
if grep -q ' _rjem_malloc$' <<<"$SYMS"; then
    # jemalloc (tikv-jemallocator, statically linked with the _rjem_ prefix): Rust's allocator
    # calls malloc/calloc/realloc for ordinary alignments and the *x variants otherwise.
    for f in _rjem_malloc _rjem_mallocx _rjem_calloc _rjem_realloc _rjem_rallocx; do
        grep -q " $f$" <<<"$SYMS" || continue
        # An explicit group: perf names it after the binary otherwise (keygate-1 → probe_keygate_1).
        perf probe -q -d "kgprof:kg$f" 2>/dev/null || true
        perf probe -q -x "$KEYGATE_BIN" --add "kgprof:kg$f=$f" 2>/dev/null && probes+=("kgprof:kg$f") || true
    done
elif nm -D --defined-only "$KEYGATE_BIN" 2>/dev/null | grep -q ' mi_malloc$' || grep -q ' mi_malloc_aligned$' <<<"$SYMS"; then
    for f in mi_malloc_aligned mi_zalloc_aligned mi_realloc_aligned mi_malloc mi_zalloc mi_realloc; do
        perf probe -q -d "kgprof:kg_$f" 2>/dev/null || true
        perf probe -q -x "$KEYGATE_BIN" --add "kgprof:kg_$f=$f" 2>/dev/null && probes+=("kgprof:kg_$f") || true
    done
else
    LIBC=$(ldd "$KEYGATE_BIN" | awk '/libc.so/ { print $3 }')
    for f in malloc calloc realloc; do
        perf probe -q -x "$LIBC" --add "kg_$f=$f" 2>/dev/null || true
        probes+=("probe_libc:kg_$f")
    done
fi
ev=$(IFS=,; echo "${probes[*]}")
perf stat -x, -e "$ev" -p "$KG_PID" -o "$WORK/alloc.txt" &
PS=$!
sleep 1
load "$PROF_N"
kill -INT "$PS"
wait "$PS" 2>/dev/null || true
echo "## Heap allocations per request (uprobes, $PROF_N requests)"
echo
awk -F, -v n="$PROF_N" '$1 ~ /^[0-9]+$/ { t += $1; printf "- %s: %.1f per request\n", $3, $1 / n } END { printf "- **total: %.1f per request**\n", t / n }' "$WORK/alloc.txt"
echo
# Where they come from: the probes' call stacks (dwarf) over fewer requests.
: "${PROF_SITES_N:=2000}"
if [[ $PROF_SITES_N -gt 0 ]]; then
    log "allocation sites ($PROF_SITES_N requests)"
    perf record -q -e "$ev" -m 2048 --call-graph dwarf,16384 -p "$KG_PID" -o "$WORK/alloc.data" 2>/dev/null &
    PR=$!
    sleep 1
    load "$PROF_SITES_N"
    kill -INT "$PR"
    wait "$PR" 2>/dev/null || true
    echo "## Allocation sites (perf record on the probes, dwarf stacks, $PROF_SITES_N requests)"
    echo
        # perf loses samples under bursts (its buffer): shares are scaled to the count above.
    per_req=$(awk -F, -v n="$PROF_N" '$1 ~ /^[0-9]+$/ { t += $1 } END { printf "%.3f", t / n }' "$WORK/alloc.txt")
    perf script -i "$WORK/alloc.data" -F ip,sym,dso 2>/dev/null | python3 "$ROOT/bench/profile_groups.py" --sites "$per_req" || true
    echo
fi
for p in "${probes[@]}"; do perf probe -q -d "${p#*:}" 2>/dev/null || true; done

}
want perf && {
log "perf record --call-graph $PROF_CALLGRAPH"
cg=(-g)
[[ $PROF_CALLGRAPH == dwarf ]] && cg=(--call-graph dwarf,16384)
perf record -q "${cg[@]}" -F "$PROF_FREQ" -p "$KG_PID" -o "$WORK/perf.data" 2>/dev/null &
PR=$!
sleep 1
load "$PROF_N"
kill -INT "$PR"
wait "$PR" 2>/dev/null || true
echo "## perf record ($PROF_CALLGRAPH call graphs): top symbols by self time"
echo
echo '```'
perf report -i "$WORK/perf.data" --no-children --sort dso,symbol --stdio 2>/dev/null | grep -E '^ +[0-9]' | sed -e 's/ *- *- *$//' | cut -c1-170 | head -40 || true
echo '```'
echo
echo "## User space by component (self and children)"
echo
perf script -i "$WORK/perf.data" -F comm,ip,sym,dso 2>/dev/null | python3 "$ROOT/bench/profile_groups.py" || true
echo
echo "## by shared object (self)"
echo
echo '```'
perf report -i "$WORK/perf.data" --no-children --sort dso --stdio 2>/dev/null | grep -E '^ +[0-9]' | sed -e 's/ *- *- *$//' | cut -c1-170 | head -12 || true
echo '```'
echo
echo "## by thread (self)"
echo
echo '```'
perf report -i "$WORK/perf.data" --no-children --sort comm --stdio 2>/dev/null | grep -E '^ +[0-9]' | sed -e 's/ *- *- *$//' | cut -c1-170 | head -8 || true
echo '```'
}
