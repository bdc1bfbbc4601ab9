#!/usr/bin/env bash
# Cluster mode's cost (issue 14 item 4), by bench/perf.sh's method: keygate with
# `[cluster]` on a loopback redis-server vs the same config without it, for a key
# WITH a rate limit and a quota (so every request needs shared state), one worker,
# the same upstream (nginx, 100-byte body). One command, bounded run time:
#
#   bash bench/cluster.sh               # ~3 minutes: 2 reps × (h1, h2) × (local, cluster)
#   CLUSTER_QUICK=1 bash bench/cluster.sh   # smoke run, ~1 minute
#
# CPU µs per request = utime+stime of the keygate process from /proc/PID/stat over the
# run ÷ requests completed (median of CLUSTER_REPS runs, local and cluster interleaved,
# both processes started side by side: the idle one costs nothing). Latency p50/p99 from
# h2load --log-file over the same runs. Redis' own CPU per request is reported beside
# (it is not keygate's, but it is the cluster's). Markdown report on stdout.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
: "${CLUSTER_QUICK:=0}"
if [[ $CLUSTER_QUICK == 1 ]]; then : "${CLUSTER_N:=20000}" "${CLUSTER_REPS:=1}"; fi
: "${CLUSTER_N:=100000}"        # requests per run (h2load -n)
: "${CLUSTER_REPS:=2}"          # runs per case (median)
: "${CLUSTER_CONNS:=50}"        # h2load -c
: "${CLUSTER_STREAMS:=10}"      # h2load -m for HTTP/2
: "${CLUSTER_RATE:=50000/s}"    # the key's rate_limit (lease: 10 ms of it, here 500 cells)
: "${CLUSTER_QUOTA:=1000000000/month}"  # the key's quota (lease: limit/1000, at most 100)
: "${CLUSTER_BUILD:=1}"         # 1: cargo build --release keygate first
: "${CLUSTER_OUT:=}"            # also write the report here
: "${CARGO_TARGET_DIR:=$ROOT/target}"
: "${KEYGATE_BIN:=$CARGO_TARGET_DIR/release/keygate}"
RUN_TIMEOUT=300

log() { printf '[cluster-bench] %s\n' "$*" >&2; }
die() { printf '[cluster-bench] ERROR: %s\n' "$*" >&2; exit 1; }
for t in nginx h2load redis-server openssl curl jq; do
    command -v "$t" >/dev/null || die "$t missing (apt-get install nginx nghttp2-client redis-server openssl curl jq)"
done
if [[ $CLUSTER_BUILD == 1 ]]; then
    log "building keygate (release)"
    (cd "$ROOT" && cargo build --release -q --bin keygate) >&2
fi
[[ -x $KEYGATE_BIN ]] || die "$KEYGATE_BIN missing"
HZ=$(getconf CLK_TCK)

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
UPSTREAM_PORT=$(free_port) REDIS_PORT=$(free_port) LOCAL_PORT=$(free_port) CLUSTER_PORT=$(free_port)

WORK=$(mktemp -d /tmp/keygate-cluster-bench.XXXXXX)
PIDS=()
cleanup() {
    local rc=$? p
    trap - EXIT INT TERM
    for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
    if [[ ${CLUSTER_KEEP:-0} == 1 ]]; then log "kept $WORK"; else rm -rf "$WORK"; fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
mkdir -p "$WORK"/{tls,upstream/tmp,raw,redis}
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
    -keyout "$WORK/tls/key.pem" -out "$WORK/tls/cert.pem" -days 30 \
    -subj /CN=localhost -addext subjectAltName=DNS:localhost,IP:127.0.0.1 2>/dev/null
KEYJSON=$("$KEYGATE_BIN" keygen --id bench --json)
TOKEN=$(jq -er .token <<<"$KEYJSON")
HASH=$(jq -er .hash <<<"$KEYJSON")
KEYH="X-API-Key: $TOKEN"

wait_port() {  # wait_port PORT PID
    local i
    for ((i = 0; i < 100; i++)); do
        kill -0 "$2" 2>/dev/null || return 1
        (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
        sleep 0.1
    done
    return 1
}
ticks() {  # utime+stime of PID, clock ticks
    local s
    s=$(cat "/proc/$1/stat") && s=${s##*) } && awk '{ print $12 + $13 }' <<<"$s"
}

# Upstream: perf.sh's nginx template (100-byte /small).
BODY100=$(printf 'x%.0s' $(seq 99))'\n'
sed -e "s#@WORK@#$WORK#g" -e "s#@UPSTREAM_PORT@#$UPSTREAM_PORT#g" -e "s#@BODY100@#$BODY100#g" \
    "$ROOT/bench/perf/upstream.nginx.conf.in" >"$WORK/upstream/nginx.conf"
nginx -e "$WORK/upstream/error.log" -p "$WORK/upstream" -c "$WORK/upstream/nginx.conf" >/dev/null 2>&1 &
PIDS+=($!)
wait_port "$UPSTREAM_PORT" "${PIDS[-1]}" || die "upstream nginx did not start"

redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no \
    --dir "$WORK/redis" >"$WORK/redis/log" 2>&1 &
REDIS_PID=$!
PIDS+=("$REDIS_PID")
wait_port "$REDIS_PORT" "$REDIS_PID" || die "redis-server did not start"

keygate_conf() {  # keygate_conf PORT [CLUSTER-LINES]
    cat <<EOF
[server]
listen = "127.0.0.1:$1"
workers = 1
idle_timeout = "120s"
max_connections = 8192
[tls]
cert = "$WORK/tls/cert.pem"
key = "$WORK/tls/key.pem"
[upstream]
url = "http://127.0.0.1:$UPSTREAM_PORT"
[auth]
header = "X-API-Key"
[log]
format = "json"
level = "warn"
[[keys]]
id = "bench"
hash = '$HASH'
max_concurrent = 1024
rate_limit = "$CLUSTER_RATE"
quota = "$CLUSTER_QUOTA"
${2:-}
EOF
}
keygate_conf "$LOCAL_PORT" >"$WORK/local.toml"
keygate_conf "$CLUSTER_PORT" "[cluster]
redis = \"redis://127.0.0.1:$REDIS_PORT\"
instance = \"bench\"" >"$WORK/cluster.toml"
declare -A PID PORT
PORT[local]=$LOCAL_PORT PORT[cluster]=$CLUSTER_PORT
for m in local cluster; do
    "$KEYGATE_BIN" run -c "$WORK/$m.toml" >"$WORK/$m.out" 2>"$WORK/$m.err" &
    PID[$m]=$!
    PIDS+=("${PID[$m]}")
    wait_port "${PORT[$m]}" "${PID[$m]}" || die "keygate ($m) did not start: $(tail -3 "$WORK/$m.out" "$WORK/$m.err")"
done
# Connected when Redis counts a client besides redis-cli itself (logs are at warn: no line).
clients() { redis-cli -p "$REDIS_PORT" info clients | sed -n 's/^connected_clients:\([0-9]*\).*/\1/p'; }
for i in $(seq 100); do (($(clients) > 1)) && break; sleep 0.1; done
(($(clients) > 1)) || die "keygate never connected to Redis"
for m in local cluster; do
    body=$(curl -sk -H "$KEYH" -w '%{http_code}' "https://127.0.0.1:${PORT[$m]}/small" || echo 000)
    [[ $body == *200 ]] || die "$m: with the key gave '${body: -20}'"
    timeout 60 h2load -n 2000 -c "$CLUSTER_CONNS" -m "$CLUSTER_STREAMS" -H "$KEYH" "https://127.0.0.1:${PORT[$m]}/small" >/dev/null 2>&1 || true
done
sleep 1.5   # the key's first use ran argon2; let that thread go quiet

declare -A R
run() {  # run MODE TAG H2LOAD-ARGS...
    local m=$1 tag=$2
    shift 2
    local raw=$WORK/raw/$tag-$m-$RANDOM c0 c1 r0 r1 la req fail lat
    la=$(cut -d' ' -f1 /proc/loadavg)
    c0=$(ticks "${PID[$m]}") r0=$(ticks "$REDIS_PID")
    timeout "$RUN_TIMEOUT" h2load "$@" --log-file "$raw.lat" -H "$KEYH" "https://127.0.0.1:${PORT[$m]}/small" >"$raw.out" 2>&1 || true
    sleep 0.5
    c1=$(ticks "${PID[$m]}") r1=$(ticks "$REDIS_PID")
    req=$(sed -n 's/^requests: .* \([0-9]*\) succeeded.*/\1/p' "$raw.out")
    fail=$(sed -n 's/^status codes: [0-9]* 2xx, \([0-9]*\) 3xx, \([0-9]*\) 4xx, \([0-9]*\) 5xx.*/\1+\2+\3/p' "$raw.out")
    fail=$((${fail:-0}))
    ((${req:-0} > 0)) || { tail -5 "$raw.out" >&2; die "$m $tag: no requests completed"; }
    local us rus
    us=$(awk -v t=$((c1 - c0)) -v hz="$HZ" -v n="$req" 'BEGIN { printf "%.2f", t * 1e6 / hz / n }')
    rus=$(awk -v t=$((r1 - r0)) -v hz="$HZ" -v n="$req" 'BEGIN { printf "%.2f", t * 1e6 / hz / n }')
    lat=$(awk '{ print $3 }' "$raw.lat" | sort -n | awk '{ v[NR] = $1 } END { if (NR) printf "%d %d", v[int(NR * 0.5) + 1], v[int(NR * 0.99) + 1] }')
    R[$tag|$m|cpu]+=" $us" R[$tag|$m|redis]+=" $rus" R[$tag|$m|load]+=" $la"
    R[$tag|$m|p50]+=" ${lat% *}" R[$tag|$m|p99]+=" ${lat#* }"
    R[$tag|$m|fail]=$(( ${R[$tag|$m|fail]:-0} + fail ))
    log "  $tag $m: $req ok, $fail non-2xx, keygate $us µs/req, redis $rus µs/req, p50/p99 $lat µs, load $la"
}
median() {
    local v
    v=$(printf '%s\n' "$@" | grep -E '^[0-9.]+$' | sort -g) || true
    [[ -z $v ]] && { echo "–"; return; }
    awk '{ a[NR] = $1 } END { if (NR % 2) printf "%.2f", a[(NR + 1) / 2]; else printf "%.2f", (a[NR / 2] + a[NR / 2 + 1]) / 2 }' <<<"$v"
}
UPTIME_BEGIN=$(uptime)
for ((i = 0; i < CLUSTER_REPS; i++)); do
    order="local cluster"; ((i % 2)) && order="cluster local"
    for m in $order; do run "$m" h1 -n "$CLUSTER_N" -c "$CLUSTER_CONNS" --h1; done
    for m in $order; do run "$m" h2 -n "$CLUSTER_N" -c "$CLUSTER_CONNS" -m "$CLUSTER_STREAMS"; done
done
UPTIME_END=$(uptime)
shared=$(redis-cli -p "$REDIS_PORT" --scan --pattern 'keygate:*' 2>/dev/null | tr '\n' ' ' || true)
degraded=$(cat "$WORK/cluster.out" "$WORK/cluster.err" | grep -c cluster_degraded || true)
limited=$(cat "$WORK/cluster.out" | grep -c '"rate_limited"' || true)

report() {
    # shellcheck disable=SC2086
    med() { median ${R[$1]:-}; }
    pct() { awk -v a="$1" -v b="$2" 'BEGIN { if (a + 0 == 0 || b + 0 == 0) print "–"; else printf "%+.1f%%", (a / b - 1) * 100 }'; }
    dms() { awk -v a="$1" -v b="$2" 'BEGIN { if (a == "–" || b == "–") print "–"; else printf "%+.2f ms", (a - b) / 1000 }'; }
    echo "# keygate cluster mode vs local (bench/cluster.sh)"
    echo
    echo "$(date -u +%Y-%m-%dT%H:%M:%SZ) · $(nproc) CPUs · $(redis-server --version | cut -d' ' -f3) · keygate $("$KEYGATE_BIN" --version | head -1) ($(cd "$ROOT" && git rev-parse --short HEAD 2>/dev/null || echo '?'))"
    echo "Key: rate_limit = \"$CLUSTER_RATE\", quota = \"$CLUSTER_QUOTA\"; workers = 1; h2load -n $CLUSTER_N -c $CLUSTER_CONNS (h2: -m $CLUSTER_STREAMS); median of $CLUSTER_REPS."
    echo "Load before/after: \`$UPTIME_BEGIN\` / \`$UPTIME_END\` (shared machine: CPU per request is what counts)."
    echo
    echo "| case | keygate CPU µs/req local | cluster | Δ CPU | p50 µs local / cluster | p99 µs local / cluster | Δ p99 | Redis µs/req | non-2xx |"
    echo "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"
    local t
    for t in h1 h2; do
        local cl cc pl pc
        cl=$(med "$t|local|cpu") cc=$(med "$t|cluster|cpu") pl=$(med "$t|local|p99") pc=$(med "$t|cluster|p99")
        echo "| $t | $cl | $cc | $(pct "$cc" "$cl") | $(med "$t|local|p50") / $(med "$t|cluster|p50") | $pl / $pc | $(dms "$pc" "$pl") | $(med "$t|cluster|redis") | ${R[$t|local|fail]:-0} / ${R[$t|cluster|fail]:-0} |"
    done
    echo
    echo "Runs (µs/req, local / cluster): h1 ${R[h1|local|cpu]} / ${R[h1|cluster|cpu]}; h2 ${R[h2|local|cpu]} / ${R[h2|cluster|cpu]}."
    echo "Keys in Redis after the runs: ${shared:-?}; cluster_degraded events: $degraded; rate_limited lines (cluster): $limited. Target (issue 14): Δ CPU ≤ +10%, Δ p99 ≤ +1 ms."
}
if [[ -n $CLUSTER_OUT ]]; then report | tee "$CLUSTER_OUT"; else report; fi
