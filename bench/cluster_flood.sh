#!/usr/bin/env bash
# Fresh user T5-17 as a measurement: an unauthenticated HTTP/2 flood (every request 401, 400
# extra fields each) against a cluster-mode keygate with one worker and the default
# `[cluster] timeout` (50 ms), `on_error = "deny"`, while a legitimate key polls every 50 ms.
# Counts `cluster_degraded` events and the key's statuses (503 = refused because the instance
# believed Redis unusable). Redis itself is idle and healthy throughout. Bounded run time:
#
#   bash bench/cluster_flood.sh                          # ~30 s: FLOOD_RUNS x 10 s flood
#   KEYGATE_BIN=/path/to/other/keygate bash bench/cluster_flood.sh   # compare binaries
#
# Needs nginx (upstream), h2load (nghttp2-client), redis-server, openssl, curl, jq.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
: "${FLOOD_SECONDS:=10}"       # h2load -D
: "${FLOOD_RUNS:=2}"
: "${FLOOD_CONNS:=8}"          # h2load -c
: "${FLOOD_STREAMS:=50}"       # h2load -m
: "${FLOOD_FIELDS:=400}"       # extra header fields per request
: "${FLOOD_TIMEOUT:=50ms}"     # [cluster] timeout (the default)
: "${CARGO_TARGET_DIR:=$ROOT/target}"
: "${KEYGATE_BIN:=$CARGO_TARGET_DIR/release/keygate}"

log() { printf '[cluster-flood] %s\n' "$*" >&2; }
die() { printf '[cluster-flood] ERROR: %s\n' "$*" >&2; exit 1; }
for t in nginx h2load redis-server openssl curl jq; do
    command -v "$t" >/dev/null || die "$t missing (apt-get install nginx nghttp2-client redis-server openssl curl jq)"
done
[[ -x $KEYGATE_BIN ]] || die "$KEYGATE_BIN missing (cargo build --release)"

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
UPSTREAM_PORT=$(free_port) REDIS_PORT=$(free_port) PORT=$(free_port) ADMIN_PORT=$(free_port)
WORK=$(mktemp -d /tmp/keygate-cluster-flood.XXXXXX)
PIDS=()
cleanup() {
    local rc=$? p
    trap - EXIT INT TERM
    for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
    rm -rf "$WORK"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
mkdir -p "$WORK"/{tls,upstream/tmp,redis}
wait_port() {
    local i
    for ((i = 0; i < 100; i++)); do
        kill -0 "$2" 2>/dev/null || return 1
        (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
        sleep 0.1
    done
    return 1
}

openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
    -keyout "$WORK/tls/key.pem" -out "$WORK/tls/cert.pem" -days 30 \
    -subj /CN=localhost -addext subjectAltName=DNS:localhost,IP:127.0.0.1 2>/dev/null
KEYJSON=$("$KEYGATE_BIN" keygen --id fast --json)
TOKEN=$(jq -er .token <<<"$KEYJSON")
HASH=$(jq -er .hash <<<"$KEYJSON")

BODY100=$(printf 'x%.0s' $(seq 99))'\n'
sed -e "s#@WORK@#$WORK#g" -e "s#@UPSTREAM_PORT@#$UPSTREAM_PORT#g" -e "s#@BODY100@#$BODY100#g" \
    "$ROOT/bench/perf/upstream.nginx.conf.in" >"$WORK/upstream/nginx.conf"
nginx -e "$WORK/upstream/error.log" -p "$WORK/upstream" -c "$WORK/upstream/nginx.conf" >/dev/null 2>&1 &
PIDS+=($!)
wait_port "$UPSTREAM_PORT" "${PIDS[-1]}" || die "upstream nginx did not start"
redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no \
    --dir "$WORK/redis" >"$WORK/redis/log" 2>&1 &
PIDS+=($!)
wait_port "$REDIS_PORT" "${PIDS[-1]}" || die "redis-server did not start"

cat >"$WORK/keygate.toml" <<EOF
[server]
listen = "127.0.0.1:$PORT"
workers = 1
[tls]
cert = "$WORK/tls/cert.pem"
key = "$WORK/tls/key.pem"
[upstream]
url = "http://127.0.0.1:$UPSTREAM_PORT"
[auth]
header = "X-API-Key"
[log]
format = "json"
level = "info"
[admin]
listen = "127.0.0.1:$ADMIN_PORT"
[cluster]
redis = "redis://127.0.0.1:$REDIS_PORT"
instance = "a"
timeout = "$FLOOD_TIMEOUT"
on_error = "deny"
[[keys]]
id = "fast"
hash = '$HASH'
rate_limit = "1000/s"
EOF
"$KEYGATE_BIN" run -c "$WORK/keygate.toml" >"$WORK/keygate.out" 2>&1 &
KG=$!
PIDS+=("$KG")
wait_port "$PORT" "$KG" || die "keygate did not start: $(tail -3 "$WORK/keygate.out")"
for _ in $(seq 100); do grep -q 'cluster connected' "$WORK/keygate.out" && break; sleep 0.1; done
grep -q 'cluster connected' "$WORK/keygate.out" || die "keygate never connected to Redis"
[[ $(curl -sk -o /dev/null -w '%{http_code}' -H "X-API-Key: $TOKEN" "https://127.0.0.1:$PORT/small") == 200 ]] ||
    die "the key is not served"

H=()
for ((i = 1; i <= FLOOD_FIELDS; i++)); do H+=(-H "x-h$i:v"); done
log "keygate $("$KEYGATE_BIN" --version | head -1), $KEYGATE_BIN; load $(cut -d' ' -f1-3 /proc/loadavg)"
total_503=0 total_200=0 total_other=0
for ((run = 1; run <= FLOOD_RUNS; run++)); do
    before=$(grep -c '"cluster_degraded"' "$WORK/keygate.out" || true)
    h2load -D "$FLOOD_SECONDS" -c "$FLOOD_CONNS" -m "$FLOOD_STREAMS" "${H[@]}" \
        "https://127.0.0.1:$PORT/x" >"$WORK/h2load.$run" 2>&1 &
    FLOOD=$!
    ok=0 refused=0 other=0
    end=$((SECONDS + FLOOD_SECONDS))
    while ((SECONDS < end)); do
        code=$(curl -sk -m 5 -o /dev/null -w '%{http_code}' -H "X-API-Key: $TOKEN" "https://127.0.0.1:$PORT/small" || echo 000)
        case $code in 200) ok=$((ok + 1)) ;; 503) refused=$((refused + 1)) ;; *) other=$((other + 1)) ;; esac
        sleep 0.05
    done
    wait "$FLOOD" || true
    after=$(grep -c '"cluster_degraded"' "$WORK/keygate.out" || true)
    flood=$(sed -n 's/^status codes: \([0-9]*\) 2xx, \([0-9]*\) 3xx, \([0-9]*\) 4xx, \([0-9]*\) 5xx.*/2xx \1, 4xx \3, 5xx \4/p' "$WORK/h2load.$run")
    rps=$(sed -n 's/^finished in .*, \([0-9.]*\) req\/s.*/\1/p' "$WORK/h2load.$run")
    echo "run $run: flood ${rps:-?} req/s ($flood); cluster_degraded $((after - before)); key: $ok x 200, $refused x 503, $other other"
    total_503=$((total_503 + refused)) total_200=$((total_200 + ok)) total_other=$((total_other + other))
    sleep 2
done
echo "total: cluster_degraded $(grep -c '"cluster_degraded"' "$WORK/keygate.out" || true), cluster_recovered $(grep -c '"cluster_recovered"' "$WORK/keygate.out" || true); key: $total_200 x 200, $total_503 x 503, $total_other other; load $(cut -d' ' -f1-3 /proc/loadavg)"
