#!/usr/bin/env bash
# Hostile-load scenarios of issue 9 §2–§4 and §6, nginx and one or more keygate builds side by
# side (one worker each, the same upstream, loopback). Markdown report on stdout. Bounded: every
# scenario has a fixed length (defaults: about 4 minutes per target).
#
#   slow_body    slowhttptest -B: ATTACK_SLOW_CONNS clients with a valid key POST a small body
#                (Content-Length 8192) a few bytes every 10 s. Counted: the most ESTABLISHED
#                connections the proxy held to the upstream at once.
#   idle         ATTACK_IDLE_CONNS TLS keep-alive connections from 200 addresses, one request
#                each, then idle. Counted: proxy RSS growth per connection (KiB), and RSS 1 s
#                after they all closed.
#   idle_h2      the same over HTTP/2 (one GET on stream 1 each, then idle; the client answers
#                PINGs).
#   slow_read    ATTACK_READERS TLS clients from 200 addresses with a 4 KiB receive buffer ask
#                for a 1 MiB response (3 pipelined) and read 32 bytes every 5 s for
#                ATTACK_READ_SECS (slowhttptest -X cannot send an API key). Counted: peak proxy
#                RSS, and RSS 30 s after the clients left.
#   one_address  127.0.0.1 holds 4,200 bare TCP connections (never starts TLS) against a
#                4,096-connection limit, while 127.0.0.2 sends 80 probes 0.1 s apart. Counted:
#                probes served and the longest outage.
#   closing      an upstream that closes every connection right after its response (without
#                `Connection: close`): h2load -c10 and -c1, failed requests; then an upstream
#                that closes keep-alive connections idle for 0.1 s, and 300 requests 0.05–0.15 s
#                apart: failed requests.
#
# For the memory scenarios (idle, idle_h2, slow_read) and slow_body keygate runs with its per-address,
# per-key and connection caps raised (max_connections 8192, max_connections_per_ip 8192,
# default_max_concurrent 8192), so that the figure is what one connection costs, not what a cap
# refused; one_address uses the defaults (that is what it tests). [upstream] max_connections stays
# at its default 1,024: with ATTACK_READERS or ATTACK_SLOW_CONNS above 1,024 the rest wait
# queue_timeout and get 503 (upstream_saturated events), and the row measures that cap, not
# what a connection costs. nginx: worker_connections 4096
# for one_address, 16384 otherwise.
#
# Usage: bash bench/attack.sh
#   env: ATTACK_SCENARIOS="slow_body idle idle_h2 slow_read one_address closing",
#        ATTACK_TARGETS="nginx keygate" (a keygate build may be named: NAME=PATH, e.g.
#        "nginx before=/tmp/keygate-old after=target/release/keygate"),
#        KEYGATE_BIN (default $CARGO_TARGET_DIR/release/keygate), ATTACK_BUILD=1 (cargo build
#        --release), ATTACK_SLOW_CONNS=600, ATTACK_SLOW_SECS=30, ATTACK_IDLE_CONNS=5000,
#        ATTACK_READERS=1000, ATTACK_READ_SECS=40, ATTACK_CLOSING_N=20000,
#        ATTACK_PORT_BASE=27100, ATTACK_KEEP=1 keeps the temp dir.
# Needs: slowhttptest, nginx, h2load (nghttp2-client), python3, openssl, jq, ss, curl.
# The system nginx service is never touched: every nginx runs from a temp dir.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BENCH=$ROOT/bench
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
: "${ATTACK_SCENARIOS:=slow_body idle idle_h2 slow_read one_address closing}"
: "${ATTACK_TARGETS:=nginx keygate}"
: "${KEYGATE_BIN:=$TARGET_DIR/release/keygate}"
: "${ATTACK_BUILD:=1}"
: "${ATTACK_SLOW_CONNS:=600}"
: "${ATTACK_SLOW_SECS:=30}"
: "${ATTACK_IDLE_CONNS:=5000}"
: "${ATTACK_READERS:=1000}"
: "${ATTACK_READ_SECS:=40}"
: "${ATTACK_CLOSING_N:=20000}"
: "${ATTACK_PORT_BASE:=27100}"
: "${ATTACK_KEEP:=0}"
UP_PORT=$ATTACK_PORT_BASE
CLOSE_PORT=$((ATTACK_PORT_BASE + 1))
IDLE_CLOSE_PORT=$((ATTACK_PORT_BASE + 2))
KG_PORT=$((ATTACK_PORT_BASE + 343))
NG_PORT=$((ATTACK_PORT_BASE + 344))

log() { printf '[attack] %s\n' "$*" >&2; }
die() { printf '[attack] ERROR: %s\n' "$*" >&2; exit 1; }
for t in slowhttptest nginx h2load python3 openssl jq ss curl; do command -v $t >/dev/null || die "$t is needed"; done
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"

if [[ $ATTACK_BUILD == 1 ]]; then
    log "building keygate and the example upstream (release)"
    (cd "$ROOT" && cargo build --release -q --bin keygate --example upstream >&2)
fi
UPSTREAM_BIN=${UPSTREAM_BIN:-$TARGET_DIR/release/examples/upstream}
[[ -x $UPSTREAM_BIN ]] || die "missing $UPSTREAM_BIN (cargo build --release --example upstream)"

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
FIRST_KG=$KEYGATE_BIN
for t in $ATTACK_TARGETS; do [[ $t == *=* ]] && { FIRST_KG=${t#*=}; break; }; done
KEYJSON=$("$FIRST_KG" keygen --id bench --json)
TOKEN=$(jq -er .token <<<"$KEYJSON")
HASH=$(jq -er .hash <<<"$KEYJSON")

NGINX_VER=$(nginx -v 2>&1 | sed -n 's#.*nginx/\([0-9.]*\).*#\1#p')
if printf '%s\n1.25.1\n' "$NGINX_VER" | sort -V -C; then LISTEN_HTTP2=http2 HTTP2_ON=""; else LISTEN_HTTP2="" HTTP2_ON="http2 on;"; fi

# nginx.conf and keygate.toml for one scenario: upstream port, nginx worker_connections, and
# whether keygate keeps its default caps.
render() {  # upstream_port worker_connections default_caps(0|1)
    sed -e "s#@WORK@#$WORK#g" -e "s#@TOKEN@#$TOKEN#g" -e "s#@UPSTREAM_PORT@#$1#g" \
        -e "s#@NGINX_TLS_PORT@#$NG_PORT#g" -e "s#@LISTEN_HTTP2@#$LISTEN_HTTP2#g" -e "s#@HTTP2_ON@#$HTTP2_ON#g" \
        -e "s#worker_connections 8192;#worker_connections $2;#" \
        "$BENCH/proxy.nginx.conf.in" >"$WORK/nginx-proxy/nginx.conf"
    local caps="" auth=""
    if [[ $3 == 0 ]]; then
        caps=$'max_connections = 8192\nmax_connections_per_ip = 8192'
        auth=$'[auth]\ndefault_max_concurrent = 8192'
    fi
    cat >"$WORK/keygate.toml" <<EOF
[server]
listen = "127.0.0.1:$KG_PORT"
workers = 1
# Idle connections are kept as long as nginx keeps them (keepalive_timeout 120s), so that the
# idle scenario measures memory rather than timeouts.
header_read_timeout = "120s"
idle_timeout = "120s"
$caps

[tls]
cert = "$WORK/tls/cert.pem"
key = "$WORK/tls/key.pem"

[upstream]
url = "http://127.0.0.1:$1"

$auth

[log]
format = "json"
level = "warn"

[[keys]]
id = "bench"
hash = '$HASH'
EOF
}

"$UPSTREAM_BIN" "127.0.0.1:$UP_PORT" 2>"$WORK/upstream.log" &
PIDS+=($!)
python3 "$BENCH/attack_clients.py" closing-upstream "$CLOSE_PORT" close &
PIDS+=($!)
python3 "$BENCH/attack_clients.py" closing-upstream "$IDLE_CLOSE_PORT" idle:0.1 &
PIDS+=($!)

for p in "$UP_PORT" "$CLOSE_PORT" "$IDLE_CLOSE_PORT"; do
    for _ in $(seq 100); do
        ss -Htln "( sport = :$p )" | grep -q . && break
        sleep 0.1
    done
done

PID="" MASTER="" PORT=""
start_target() {  # nginx | keygate BIN; sets PID (the process whose memory is measured)
    if [[ $1 == nginx ]]; then
        nginx -p "$WORK/nginx-proxy" -c "$WORK/nginx-proxy/nginx.conf" 2>"$WORK/nginx.err" &
        MASTER=$!
        PORT=$NG_PORT
        PIDS+=("$MASTER")
        PID=""
        for _ in $(seq 50); do
            PID=$(pgrep -P "$MASTER" | head -1 || true)
            [[ -n $PID ]] && break
            sleep 0.1
        done
    else
        "$2" run -c "$WORK/keygate.toml" >"$WORK/keygate.log" 2>&1 &
        PID=$!
        MASTER=""
        PORT=$KG_PORT
    fi
    PIDS+=("$PID")
    for _ in $(seq 100); do
        curl -sk -o /dev/null "https://127.0.0.1:$PORT/" && break
        sleep 0.1
    done
    local st
    st=$(curl -sk -o /dev/null -w '%{http_code}' -H "X-API-Key: $TOKEN" "https://127.0.0.1:$PORT/small")
    [[ $st == 200 ]] || die "$1 does not serve: $st ($(tail -3 "$WORK/keygate.log" "$WORK/nginx.err" 2>/dev/null))"
    # The first request's argon2 verification (keygate) is over; let its memory settle.
    sleep 2
}
stop_target() {
    if [[ -n $MASTER ]]; then kill "$MASTER" 2>/dev/null || true; else kill "$PID" 2>/dev/null || true; fi
    wait "$PID" 2>/dev/null || true
    [[ -n $MASTER ]] && { wait "$MASTER" 2>/dev/null || true; }
    sleep 1
}
rss() { awk '/VmRSS/ {print $2}' "/proc/$PID/status"; }
upstream_conns() { ss -Htn state established "( dport = :$UP_PORT )" | wc -l; }
loadavg() { cut -d' ' -f1-3 /proc/loadavg; }
# slowhttptest has no option for an arbitrary header; in -B mode the key rides on the Accept
# value (checked: the request carries "Accept: */*" and "X-API-Key: …" as two fields).
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
    out=$(sed 's/\x1b\[[0-9;]*m//g' "$WORK/slow_body.$1.out" | grep -a 'connected:' | tail -1 | tr -cd '0-9' || true)
    row "slow_body | $1 | upstream connections held (peak) | $peak | ${ATTACK_SLOW_CONNS} slow POST clients (${out:-?} connected at the end), ${ATTACK_SLOW_SECS} s; load $(loadavg)"
}

idle() { idle_with idle "$1" "KiB per idle TLS keep-alive connection"; }
idle_h2() { idle_with idle-h2 "$1" "KiB per idle HTTP/2 TLS connection"; }
idle_with() {  # client-command name measure
    local before after got closed sc=${1/-/_}
    shift
    before=$(rss)
    rm -f "$WORK/$sc.$1.out"
    python3 "$BENCH/attack_clients.py" "${sc/_/-}" "$ATTACK_IDLE_CONNS" 127.0.0.1 "$PORT" "$TOKEN" /small >"$WORK/$sc.$1.out" 2>&1 &
    local cl=$!
    for _ in $(seq 600); do grep -q '^ready' "$WORK/$sc.$1.out" 2>/dev/null && break; sleep 0.2; done
    sleep 2
    after=$(rss)
    got=$(awk '/^ready/ {print $2}' "$WORK/$sc.$1.out")
    kill $cl 2>/dev/null || true
    wait $cl 2>/dev/null || true
    sleep 1
    closed=$(rss)
    row "$sc | $1 | $2 | $(((after - before) / (got > 0 ? got : 1))) | RSS $before → $after KiB with $got connections ($(awk '/^ready/ {$1=$2=""; print}' "$WORK/$sc.$1.out")), $closed KiB 1 s after they closed; load $(loadavg)"
}

slow_read() {
    local peak=0 r after idle0 res
    idle0=$(rss)
    rm -f "$WORK/slow_read.$1.out"
    python3 "$BENCH/attack_clients.py" slowread "$ATTACK_READERS" 127.0.0.1 "$PORT" "$TOKEN" "/bytes?n=1048576" "$ATTACK_READ_SECS" >"$WORK/slow_read.$1.out" 2>&1 &
    local st=$!
    while kill -0 $st 2>/dev/null; do
        r=$(rss)
        ((r > peak)) && peak=$r
        sleep 1
    done
    wait $st || true
    res=$(tr '\n' ' ' <"$WORK/slow_read.$1.out")
    sleep 30
    after=$(rss)
    local capped=""
    [[ $1 != nginx ]] && ((ATTACK_READERS > 1024)) && capped=" (keygate: readers beyond [upstream] max_connections 1024 get 503 after queue_timeout)"
    row "slow_read | $1 | peak RSS MiB / 30 s after MiB | $((peak / 1024)) / $((after / 1024)) | $ATTACK_READERS slow readers of 3 x 1 MiB, ${ATTACK_READ_SECS} s (client: $res); RSS before $((idle0 / 1024)) MiB; load $(loadavg)$capped"
}

one_address() {
    rm -f "$WORK/bare.$1.out"
    python3 "$BENCH/attack_clients.py" bare 4200 127.0.0.1 "$PORT" 127.0.0.1 >"$WORK/bare.$1.out" 2>&1 &
    local cl=$!
    for _ in $(seq 300); do grep -q '^ready' "$WORK/bare.$1.out" 2>/dev/null && break; sleep 0.2; done
    local res
    res=$(python3 "$BENCH/attack_clients.py" probe 127.0.0.1 "$PORT" "$TOKEN" 127.0.0.2 80 0.1)
    kill $cl 2>/dev/null || true
    wait $cl 2>/dev/null || true
    row "one_address | $1 | probes from 127.0.0.2 served | $res | 127.0.0.1 opened $(awk '/^ready/ {print $2}' "$WORK/bare.$1.out") bare TCP connections first; load $(loadavg)"
}

h2load_failed() {  # args…: prints "failed/total"
    local out
    out=$(timeout 300 h2load --h1 "$@" -H "X-API-Key: $TOKEN" "https://127.0.0.1:$PORT/small" 2>&1 || true)
    awk '/^requests:/ {gsub(",",""); t=$2; for (i=1;i<=NF;i++) if ($(i+1) ~ /^(succeeded|failed|errored|timeout)$/) v[$(i+1)]=$i}
         /^status codes:/ {gsub(",",""); s2=$3} END {printf "%d/%d", t - s2, t}' <<<"$out"
}

closing() {
    local c10 c1 paced
    c10=$(h2load_failed -n "$ATTACK_CLOSING_N" -c 10)
    c1=$(h2load_failed -n $((ATTACK_CLOSING_N / 4)) -c 1)
    row "closing | $1 | failed requests (not 2xx): h2load -c10 / -c1 | $c10 / $c1 | upstream closes every connection after its response; load $(loadavg)"
}

idle_close() {
    local res
    res=$(python3 "$BENCH/attack_clients.py" paced 127.0.0.1 "$PORT" "$TOKEN" /small 300 0.05 0.15)
    row "idle_close | $1 | requests failed of 300 | ${res#ok * failed } | upstream closes keep-alive connections idle for 0.1 s, requests 0.05–0.15 s apart ($res); load $(loadavg)"
}

for target in $ATTACK_TARGETS; do
    name=${target%%=*}
    bin=$KEYGATE_BIN
    [[ $target == *=* ]] && bin=${target#*=}
    [[ $name == nginx ]] && bin=nginx
    for sc in $ATTACK_SCENARIOS; do
        log "$sc against $name"
        case $sc in
        one_address) render "$UP_PORT" 4096 1 ;;
        closing) render "$CLOSE_PORT" 16384 0 ;;
        *) render "$UP_PORT" 16384 0 ;;
        esac
        # An older build that does not know the cap settings runs with its defaults.
        if [[ $bin != nginx ]] && ! "$bin" check -c "$WORK/keygate.toml" >/dev/null 2>&1; then
            log "$name does not accept the raised caps; running it with its defaults"
            render "$(sed -n 's#^url = "http://127.0.0.1:\([0-9]*\)"#\1#p' "$WORK/keygate.toml")" 16384 1
        fi
        start_target "$bin" "$bin"
        "$sc" "$name"
        if [[ $sc == closing ]]; then
            stop_target
            render "$IDLE_CLOSE_PORT" 16384 0
            start_target "$bin" "$bin"
            idle_close "$name"
        fi
        stop_target
    done
done

echo "## keygate vs nginx under hostile load (bench/attack.sh)"
echo
echo "One worker each, loopback, upstream: examples/upstream (release), or the closing upstreams of bench/attack_clients.py. nginx $NGINX_VER, $(nproc) CPUs. Targets: $ATTACK_TARGETS."
echo
echo "| scenario | proxy | measure | value | notes |"
echo "| --- | --- | --- | --- | --- |"
printf '%s\n' "${ROWS[@]}"
