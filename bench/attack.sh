#!/usr/bin/env bash
# Hostile-load scenarios of issue 9 §2–§4, keygate and nginx side by side (one worker each, the
# same upstream, loopback). Markdown report on stdout. Bounded: every scenario has a fixed
# length (defaults: about 6 minutes in all).
#
#   slow_body    slowhttptest -B: ATTACK_SLOW_CONNS clients with a valid key POST a small body
#                (Content-Length 8192) a few bytes every 10 s. Counted: the most ESTABLISHED
#                connections the proxy held to the upstream at once.
#   idle         ATTACK_IDLE_CONNS TLS keep-alive connections, one request each, then idle.
#                Counted: proxy RSS growth per connection (KiB).
#   slow_read    slowhttptest -X: ATTACK_READERS clients read a 1 MiB response (x3 pipelined)
#                through a tiny TCP window. Counted: peak proxy RSS, and RSS 30 s after the
#                attack ended.
#   one_address  127.0.0.1 holds 4,200 bare TCP connections (never starts TLS) against a
#                4,096-connection limit, while 127.0.0.2 sends 80 probes 0.1 s apart. Counted:
#                probes served and the longest outage.
#
# Usage: bash bench/attack.sh
#   env: ATTACK_SCENARIOS="slow_body idle slow_read one_address", ATTACK_TARGETS="keygate nginx",
#        KEYGATE_BIN (default target/release/keygate), ATTACK_BUILD=1 (cargo build --release),
#        ATTACK_SLOW_CONNS=600, ATTACK_SLOW_SECS=30, ATTACK_IDLE_CONNS=5000, ATTACK_READERS=1000,
#        ATTACK_READ_SECS=40, ATTACK_KEEP=1 keeps the temp dir, ATTACK_KEYGATE_EXTRA (TOML lines
#        appended to keygate's [server] section).
# Needs: slowhttptest, nginx, python3, openssl, jq, ss (apt-get install slowhttptest nginx-light
# jq iproute2). The system nginx service is never touched: every nginx runs from a temp dir.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BENCH=$ROOT/bench
: "${ATTACK_SCENARIOS:=slow_body idle slow_read one_address}"
: "${ATTACK_TARGETS:=keygate nginx}"
: "${KEYGATE_BIN:=$ROOT/target/release/keygate}"
: "${ATTACK_BUILD:=1}"
: "${ATTACK_SLOW_CONNS:=600}"
: "${ATTACK_SLOW_SECS:=30}"
: "${ATTACK_IDLE_CONNS:=5000}"
: "${ATTACK_READERS:=1000}"
: "${ATTACK_READ_SECS:=40}"
: "${ATTACK_KEEP:=0}"
: "${ATTACK_KEYGATE_EXTRA:=}"
UP_PORT=18100 KG_PORT=18443 NG_PORT=18444

log() { printf '[attack] %s\n' "$*" >&2; }
die() { printf '[attack] ERROR: %s\n' "$*" >&2; exit 1; }
for t in slowhttptest nginx python3 openssl jq ss; do command -v $t >/dev/null || die "$t is needed"; done
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"

if [[ $ATTACK_BUILD == 1 ]]; then
    log "building keygate and the example upstream (release)"
    (cd "$ROOT" && cargo build --release -q --bin keygate --example upstream >&2)
fi
UPSTREAM_BIN=${UPSTREAM_BIN:-$(dirname "$KEYGATE_BIN")/examples/upstream}
[[ -x $UPSTREAM_BIN ]] || UPSTREAM_BIN=$ROOT/target/release/examples/upstream
[[ -x $KEYGATE_BIN && -x $UPSTREAM_BIN ]] || die "missing $KEYGATE_BIN or $UPSTREAM_BIN"

WORK=$(mktemp -d /tmp/keygate-attack.XXXXXX)
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    if [[ $ATTACK_KEEP == 1 ]]; then log "kept $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
mkdir -p "$WORK/tls" "$WORK/nginx-proxy/tmp"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
    -keyout "$WORK/tls/key.pem" -out "$WORK/tls/cert.pem" -days 30 -subj /CN=localhost \
    -addext subjectAltName=DNS:localhost,IP:127.0.0.1 2>/dev/null
KEYJSON=$("$KEYGATE_BIN" keygen --id bench --json)
TOKEN=$(jq -er .token <<<"$KEYJSON")
HASH=$(jq -er .hash <<<"$KEYJSON")

NGINX_VER=$(nginx -v 2>&1 | sed -n 's#.*nginx/\([0-9.]*\).*#\1#p')
if printf '%s\n1.25.1\n' "$NGINX_VER" | sort -V -C; then LISTEN_HTTP2=http2 HTTP2_ON=""; else LISTEN_HTTP2="" HTTP2_ON="http2 on;"; fi
sed -e "s#@WORK@#$WORK#g" -e "s#@TOKEN@#$TOKEN#g" -e "s#@UPSTREAM_PORT@#$UP_PORT#g" \
    -e "s#@NGINX_TLS_PORT@#$NG_PORT#g" -e "s#@LISTEN_HTTP2@#$LISTEN_HTTP2#g" -e "s#@HTTP2_ON@#$HTTP2_ON#g" \
    -e "s#worker_connections 8192;#worker_connections 4096;#" \
    "$BENCH/proxy.nginx.conf.in" >"$WORK/nginx-proxy/nginx.conf"

cat >"$WORK/keygate.toml" <<EOF
[server]
listen = "127.0.0.1:$KG_PORT"
workers = 1
# Idle connections are kept as long as nginx keeps them (keepalive_timeout 120s), so that the
# idle scenario measures memory rather than timeouts.
header_read_timeout = "120s"
idle_timeout = "120s"
$ATTACK_KEYGATE_EXTRA

[tls]
cert = "$WORK/tls/cert.pem"
key = "$WORK/tls/key.pem"

[upstream]
url = "http://127.0.0.1:$UP_PORT"

[log]
format = "json"
level = "warn"

[[keys]]
id = "bench"
hash = '$HASH'
EOF

"$UPSTREAM_BIN" "127.0.0.1:$UP_PORT" 2>"$WORK/upstream.log" &
PIDS+=($!)

PID=""
start_target() {  # keygate | nginx; sets PID (the process whose memory is measured)
    case $1 in
    keygate)
        "$KEYGATE_BIN" run -c "$WORK/keygate.toml" >"$WORK/keygate.log" 2>&1 &
        PID=$!
        PORT=$KG_PORT
        ;;
    nginx)
        nginx -p "$WORK/nginx-proxy" -c "$WORK/nginx-proxy/nginx.conf" 2>"$WORK/nginx.err" &
        local master=$!
        PORT=$NG_PORT
        for _ in $(seq 50); do
            PID=$(pgrep -P "$master" | head -1 || true)
            [[ -n $PID ]] && break
            sleep 0.1
        done
        PIDS+=("$master")
        ;;
    esac
    PIDS+=("$PID")
    for _ in $(seq 100); do
        curl -sk -o /dev/null "https://127.0.0.1:$PORT/" && break
        sleep 0.1
    done
    local st
    st=$(curl -sk -o /dev/null -w '%{http_code}' -H "X-API-Key: $TOKEN" "https://127.0.0.1:$PORT/small")
    [[ $st == 200 ]] || die "$1 does not serve: $st"
}
stop_target() {
    if [[ $1 == nginx ]]; then
        kill "$(cat "$WORK/nginx-proxy/nginx.pid")" 2>/dev/null || true
    else
        kill "$PID" 2>/dev/null || true
    fi
    sleep 1
}
rss() { awk '/VmRSS/ {print $2}' "/proc/$PID/status"; }
upstream_conns() { ss -Htn state established "( dport = :$UP_PORT )" | wc -l; }
# slowhttptest has no option for an arbitrary header; the key rides on the Accept value.
ACCEPT=$'*/*\r\nX-API-Key: '"$TOKEN"

ROWS=()
row() { ROWS+=("| $* |"); }

slow_body() {
    local peak=0 n out
    slowhttptest -B -c "$ATTACK_SLOW_CONNS" -r 200 -i 10 -s 8192 -x 10 -l "$ATTACK_SLOW_SECS" -p 3 \
        -t POST -m "$ACCEPT" -u "https://127.0.0.1:$PORT/upload" >"$WORK/slow_body.$1.out" 2>&1 &
    local st=$!
    while kill -0 $st 2>/dev/null; do
        n=$(upstream_conns)
        ((n > peak)) && peak=$n
        sleep 1
    done
    wait $st || true
    out=$(grep -a 'connected' "$WORK/slow_body.$1.out" | tail -1 | tr -s ' ' || true)
    row "slow_body | $1 | upstream connections held (peak) | $peak | ${ATTACK_SLOW_CONNS} slow POST clients, ${ATTACK_SLOW_SECS} s; last slowhttptest line: ${out//|/}"
}

idle() {
    local before after got
    sleep 1
    before=$(rss)
    python3 "$BENCH/attack_clients.py" idle "$ATTACK_IDLE_CONNS" 127.0.0.1 "$PORT" "$TOKEN" /small >"$WORK/idle.$1.out" 2>&1 &
    local cl=$!
    for _ in $(seq 600); do grep -q '^ready' "$WORK/idle.$1.out" && break; sleep 0.2; done
    sleep 2
    after=$(rss)
    got=$(awk '/^ready/ {print $2}' "$WORK/idle.$1.out")
    kill $cl 2>/dev/null || true
    wait $cl 2>/dev/null || true
    row "idle | $1 | KiB per idle TLS keep-alive connection | $(((after - before) / (got > 0 ? got : 1))) | RSS $before → $after KiB with $got connections ($(awk '/^ready/ {$1=$2=""; print}' "$WORK/idle.$1.out"))"
}

slow_read() {
    local peak=0 r after
    slowhttptest -X -c "$ATTACK_READERS" -r 200 -w 512 -y 1024 -n 5 -z 32 -k 3 -l "$ATTACK_READ_SECS" -p 3 \
        -m "$ACCEPT" -u "https://127.0.0.1:$PORT/bytes?n=1048576" >"$WORK/slow_read.$1.out" 2>&1 &
    local st=$!
    while kill -0 $st 2>/dev/null; do
        r=$(rss)
        ((r > peak)) && peak=$r
        sleep 1
    done
    wait $st || true
    sleep 30
    after=$(rss)
    row "slow_read | $1 | peak RSS MiB / 30 s after MiB | $((peak / 1024)) / $((after / 1024)) | $ATTACK_READERS slow readers of 3 x 1 MiB, ${ATTACK_READ_SECS} s"
}

one_address() {
    python3 "$BENCH/attack_clients.py" bare 4200 127.0.0.1 "$PORT" 127.0.0.1 >"$WORK/bare.$1.out" 2>&1 &
    local cl=$!
    for _ in $(seq 300); do grep -q '^ready' "$WORK/bare.$1.out" && break; sleep 0.2; done
    local res
    res=$(python3 "$BENCH/attack_clients.py" probe 127.0.0.1 "$PORT" "$TOKEN" 127.0.0.2 80 0.1)
    kill $cl 2>/dev/null || true
    wait $cl 2>/dev/null || true
    row "one_address | $1 | probes from 127.0.0.2 served | $res | 127.0.0.1 opened $(awk '/^ready/ {print $2}' "$WORK/bare.$1.out") bare TCP connections first"
}

for target in $ATTACK_TARGETS; do
    for sc in $ATTACK_SCENARIOS; do
        log "$sc against $target"
        start_target "$target"
        "$sc" "$target"
        stop_target "$target"
    done
done

echo "## keygate vs nginx under hostile load (bench/attack.sh)"
echo
echo "One worker each, loopback, upstream: examples/upstream (release). keygate $("$KEYGATE_BIN" --version 2>/dev/null || true), nginx $NGINX_VER, $(nproc) CPUs."
echo
echo "| scenario | proxy | measure | value | notes |"
echo "| --- | --- | --- | --- | --- |"
printf '%s\n' "${ROWS[@]}"
