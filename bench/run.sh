#!/usr/bin/env bash
# keygate benchmark harness.
#
# Compares, on loopback, one after the other:
#   direct   the upstream itself (nginx, plain HTTP, 1 worker) on 127.0.0.1:$UPSTREAM_PORT
#   keygate  keygate (workers = 1) TLS proxy in front of it, X-API-Key auth, JSON access log
#   nginx    nginx (worker_processes 1) configured as the equivalent TLS proxy
# Cases: small body HTTP/1.1 keep-alive (wrk), small body HTTP/2 (h2load),
# full TLS handshake per request (bench/hsload), 1 MiB body HTTP/1.1 (wrk).
# For each run: req/s, p50/p99 latency, proxy CPU µs per request (utime+stime
# from /proc/PID/stat), proxy CPU utilisation, RSS; then ratios.
# The Markdown report goes to stdout (progress to stderr). See bench/README.md.
#
# Usage: bash bench/run.sh            (env knobs below; e.g. BENCH_DURATION=5)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BENCH_DIR=$ROOT/bench

: "${BENCH_DURATION:=10}"        # seconds per measured run
: "${BENCH_WARMUP:=2}"           # seconds of unmeasured warm-up before each run (0: none)
: "${BENCH_CONNS:=50}"           # connections for the keep-alive cases (wrk -c, h2load -c)
: "${BENCH_H2_STREAMS:=10}"      # h2load -m (concurrent streams per connection)
: "${BENCH_HS_CONNS:=10}"        # concurrent clients in the full-handshake case
: "${BENCH_BIG_CONNS:=10}"       # connections for the 1 MiB case
: "${BENCH_BIG:=1}"              # 1: run the 1 MiB case, 0: skip it
: "${BENCH_TARGETS:=direct keygate nginx}"
: "${BENCH_PIN:=1}"              # 1: pin proxy to CPU 0, upstream + load generator elsewhere
: "${BENCH_INSTALL:=1}"          # 1: apt-get install missing tools (needs root)
: "${BENCH_BUILD:=1}"            # 1: cargo build --release keygate and bench/hsload first
: "${BENCH_KEEP:=0}"             # 1: keep the temp dir (configs, logs, raw outputs)
: "${BENCH_OUT:=}"               # also write the Markdown report to this file
: "${BENCH_IDLE_MAX:=10}"        # % of all CPUs busy (other processes) tolerated before a run
: "${BENCH_WAIT_IDLE:=60}"       # seconds to wait for the machine to calm down before a run
: "${UPSTREAM_PORT:=8000}"
: "${KEYGATE_PORT:=8443}"
: "${NGINX_TLS_PORT:=8444}"
: "${KEYGATE_BIN:=$ROOT/target/release/keygate}"
: "${HSLOAD_TARGET_DIR:=$ROOT/target/bench-hsload}"
HSLOAD_BIN=$HSLOAD_TARGET_DIR/release/hsload

log() { printf '[bench] %s\n' "$*" >&2; }
die() { printf '[bench] ERROR: %s\n' "$*" >&2; exit 1; }

# ---------------------------------------------------------------- prerequisites
need_pkgs=()
for tool_pkg in nginx:nginx wrk:wrk h2load:nghttp2-client openssl:openssl curl:curl \
                jq:jq taskset:util-linux ss:iproute2 getconf:libc-bin; do
    command -v "${tool_pkg%%:*}" >/dev/null 2>&1 || need_pkgs+=("${tool_pkg#*:}")
done
if ((${#need_pkgs[@]})); then
    if [[ $BENCH_INSTALL == 1 && $(id -u) == 0 ]]; then
        log "installing: ${need_pkgs[*]}"
        apt-get update -q >&2
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need_pkgs[@]}" >&2
    else
        die "missing packages: ${need_pkgs[*]} (run as root with BENCH_INSTALL=1, or install them)"
    fi
fi
command -v cargo >/dev/null 2>&1 || die "cargo not found (needed for keygate and bench/hsload)"

for port in "$UPSTREAM_PORT" "$KEYGATE_PORT" "$NGINX_TLS_PORT"; do
    if ss -Hltn "sport = :$port" | grep -q .; then
        die "port $port is already in use (set UPSTREAM_PORT / KEYGATE_PORT / NGINX_TLS_PORT)"
    fi
done

want() { [[ " $BENCH_TARGETS " == *" $1 "* ]]; }

if [[ $BENCH_BUILD == 1 ]]; then
    log "building bench/hsload (full-handshake client)"
    (cd "$BENCH_DIR/hsload" &&
        { cargo build --release --offline -q --target-dir "$HSLOAD_TARGET_DIR" 2>/dev/null ||
          cargo build --release -q --target-dir "$HSLOAD_TARGET_DIR"; }) >&2
    if want keygate; then
        log "building keygate (cargo build --release)"
        (cd "$ROOT" && cargo build --release -q) >&2
    fi
fi
[[ -x $HSLOAD_BIN ]] || die "$HSLOAD_BIN missing (run with BENCH_BUILD=1)"
if want keygate; then
    [[ -x $KEYGATE_BIN ]] || die "$KEYGATE_BIN missing (cargo build --release)"
fi

CLK_TCK=$(getconf CLK_TCK)
NCPU=$(nproc)
if [[ $BENCH_PIN == 1 && $NCPU -ge 2 ]]; then
    PROXY_CPU=0
    UPSTREAM_CPU=1
    if ((NCPU == 2)); then LOADGEN_CPUS=1; else LOADGEN_CPUS=2-$((NCPU - 1)); fi
    # With no proxy in between, the load generator takes the proxy's CPU.
    DIRECT_LOADGEN_CPUS=$PROXY_CPU
    PINNING=1
    PIN_NOTE="proxy pinned to CPU $PROXY_CPU; upstream on CPU $UPSTREAM_CPU; load generator on CPU $LOADGEN_CPUS (direct runs: CPU $DIRECT_LOADGEN_CPUS)"
else
    PROXY_CPU= UPSTREAM_CPU= LOADGEN_CPUS= DIRECT_LOADGEN_CPUS=
    PINNING=0
    PIN_NOTE="no CPU pinning"
fi

# pin CPUS CMD...: run CMD in the foreground on those CPUs (no pinning when
# BENCH_PIN=0 or CPUS is empty).
pin() {
    local cpus=$1
    shift
    if [[ $PINNING == 1 && -n $cpus ]]; then
        (exec taskset -c "$cpus" "$@")
    else
        (exec "$@")
    fi
}
# pin_bg CPUS CMD...: start CMD in the background; BG_PID is CMD's own pid.
pin_bg() {
    local cpus=$1
    shift
    if [[ $PINNING == 1 && -n $cpus ]]; then
        exec_bg taskset -c "$cpus" "$@"
    else
        exec_bg "$@"
    fi
}
exec_bg() { "$@" & BG_PID=$!; }

# ---------------------------------------------------------------- work dir, cleanup
WORK=$(mktemp -d /tmp/keygate-bench.XXXXXX)
chmod 711 "$WORK"   # nginx workers (user nobody) must reach www/
cd "$WORK"
PIDS=()
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    local p
    for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    for p in "${PIDS[@]}"; do
        for _ in 1 2 3 4 5 6 7 8 9 10; do kill -0 "$p" 2>/dev/null || break; sleep 0.2; done
        kill -KILL "$p" 2>/dev/null || true
        wait "$p" 2>/dev/null || true
    done
    if [[ $BENCH_KEEP == 1 ]]; then
        log "kept $WORK"
    else
        rm -rf "$WORK"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

mkdir -p "$WORK"/{tls,www,upstream/tmp,nginx-proxy/tmp,keygate,raw}
chmod 755 "$WORK/www"
chmod 700 "$WORK/tls"

log "work dir $WORK"
# ECDSA P-256 self-signed certificate for localhost (temp dir only, deleted at exit).
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
    -keyout "$WORK/tls/key.pem" -out "$WORK/tls/cert.pem" -days 365 \
    -subj /CN=localhost -addext subjectAltName=DNS:localhost,IP:127.0.0.1 2>/dev/null
head -c 1048576 /dev/urandom >"$WORK/www/big.bin"
chmod 644 "$WORK/www/big.bin"

# API key: keygate's own keygen when it is benchmarked, else any token.
if want keygate; then
    KEYJSON=$("$KEYGATE_BIN" keygen --id bench --json) || die "keygate keygen --id bench --json failed"
    TOKEN=$(jq -er .token <<<"$KEYJSON") || die "keygen output has no token: $KEYJSON"
    HASH=$(jq -er .hash <<<"$KEYJSON") || die "keygen output has no hash: $KEYJSON"
else
    TOKEN=kg_bench_$(openssl rand -hex 16)
    HASH=unused
fi
APIKEY_HEADER="X-API-Key: $TOKEN"

NGINX_VER=$(nginx -v 2>&1 | sed -n 's#.*nginx/\([0-9.]*\).*#\1#p')
if printf '%s\n1.25.1\n' "$NGINX_VER" | sort -V -C; then
    LISTEN_HTTP2=http2 HTTP2_ON=""           # nginx < 1.25.1: "listen ... ssl http2"
else
    LISTEN_HTTP2="" HTTP2_ON="http2 on;"
fi
[[ $NGINX_VER == 1.25.1 ]] && LISTEN_HTTP2="" HTTP2_ON="http2 on;"

sed_escape() { printf '%s' "$1" | sed -e 's/[\\&#]/\\&/g'; }
render() {  # render TEMPLATE OUTPUT
    sed -e "s#@WORK@#$(sed_escape "$WORK")#g" \
        -e "s#@UPSTREAM_PORT@#$UPSTREAM_PORT#g" \
        -e "s#@KEYGATE_PORT@#$KEYGATE_PORT#g" \
        -e "s#@NGINX_TLS_PORT@#$NGINX_TLS_PORT#g" \
        -e "s#@TOKEN@#$(sed_escape "$TOKEN")#g" \
        -e "s#@HASH@#$(sed_escape "$HASH")#g" \
        -e "s#@LISTEN_HTTP2@#$LISTEN_HTTP2#g" \
        -e "s#@HTTP2_ON@#$HTTP2_ON#g" \
        "$1" >"$2"
}
render "$BENCH_DIR/upstream.nginx.conf.in" "$WORK/upstream/nginx.conf"
render "$BENCH_DIR/proxy.nginx.conf.in" "$WORK/nginx-proxy/nginx.conf"
render "$BENCH_DIR/keygate.toml.in" "$WORK/keygate/keygate.toml"

wait_port() {  # wait_port PORT PID NAME
    local i
    for ((i = 0; i < 100; i++)); do
        kill -0 "$2" 2>/dev/null || return 1
        if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
        sleep 0.1
    done
    return 1
}

start_nginx() {  # start_nginx DIR CPU -> sets NGINX_PID
    local dir=$1 cpu=$2
    nginx -t -q -e "$dir/error.log" -p "$dir" -c "$dir/nginx.conf" >&2 ||
        die "nginx config $dir/nginx.conf rejected"
    pin_bg "$cpu" nginx -e "$dir/error.log" -p "$dir" -c "$dir/nginx.conf" >"$dir/stdout.log" 2>&1
    NGINX_PID=$BG_PID
    PIDS+=("$NGINX_PID")
}

# ---------------------------------------------------------------- measurement helpers
cpu_ticks() {  # utime+stime of the given pids (all threads)
    local p sum=0 t
    for p in "$@"; do
        t=$(awk '{ sub(/^.*\) /, ""); print $12 + $13 }' "/proc/$p/stat" 2>/dev/null || echo 0)
        sum=$((sum + t))
    done
    echo "$sum"
}
status_kib() { awk -v k="$2:" '$1 == k { print $2 }' "/proc/$1/status" 2>/dev/null || echo 0; }
mib() { awk -v k="$1" 'BEGIN { printf "%.1f", k / 1024 }'; }

# Process info of the server under test, set before its runs.
MEASURE_PIDS=()   # pids whose CPU is counted (nginx: master + workers)
RSS_PID=          # process whose RSS is reported (nginx: the worker)

rss_sampler() {  # rss_sampler PID OUTFILE STOPFILE: max VmRSS (KiB) while running
    local max=0 v
    while [[ ! -e $3 ]]; do
        v=$(status_kib "$1" VmRSS)
        ((v > max)) && max=$v
        sleep 0.25
    done
    echo "$max" >"$2"
}

# System-wide busy CPU % (all CPUs) over 0.5 s, from /proc/stat.
system_busy_pct() {
    local a b
    a=$(awk '/^cpu / { print $2 + $3 + $4 + $7 + $8 + $9, $5 + $6 }' /proc/stat)
    sleep 0.5
    b=$(awk '/^cpu / { print $2 + $3 + $4 + $7 + $8 + $9, $5 + $6 }' /proc/stat)
    awk -v a="$a" -v b="$b" 'BEGIN { split(a, x, " "); split(b, y, " ")
        busy = y[1] - x[1]; idle = y[2] - x[2]
        printf "%.0f", (busy + idle > 0 ? 100 * busy / (busy + idle) : 0) }'
}
# Before each run: wait (up to BENCH_WAIT_IDLE s) until other processes leave
# the CPUs alone. Sets BUSY (% of the machine busy just before the run).
wait_idle() {
    local waited=0
    BUSY=$(system_busy_pct)
    while ((BUSY > BENCH_IDLE_MAX && waited < BENCH_WAIT_IDLE)); do
        ((waited == 0)) && log "  machine is ${BUSY}% busy before the run; waiting up to ${BENCH_WAIT_IDLE}s"
        sleep 0.5
        waited=$((waited + 1))
        BUSY=$(system_busy_pct)
    done
    if ((BUSY > BENCH_IDLE_MAX)); then log "  still ${BUSY}% busy; running anyway (row marked ⚠)"; fi
}

declare -A R   # results: R[target|case|field]
CASES=()       # ordered "target|case" keys that ran

# run_case TARGET CASE TOOL CPUS -- command...
# TOOL is wrk | h2load | hsload (how to parse the output). For h2load, the
# command must contain "--log-file @LOG@"; for warm-up runs the duration token
# "@DUR@" is replaced by BENCH_WARMUP, for the measured run by BENCH_DURATION.
run_case() {
    local target=$1 case=$2 tool=$3 cpus=$4
    shift 5
    local key="$target|$case" raw="$WORK/raw/${target}-${case}"
    local -a cmd
    wait_idle
    R[$key|busy_before]=$BUSY
    if ((BENCH_WARMUP > 0)); then
        cmd=("${@//@DUR@/$BENCH_WARMUP}")
        cmd=("${cmd[@]//@LOG@/$raw.warmup.log}")
        pin "$cpus" "${cmd[@]}" >"$raw.warmup.out" 2>&1 || true
    fi
    cmd=("${@//@DUR@/$BENCH_DURATION}")
    cmd=("${cmd[@]//@LOG@/$raw.requests.log}")
    log "$target / $case: ${cmd[*]//$TOKEN/<token>}"

    rm -f "$raw.stop"
    rss_sampler "$RSS_PID" "$raw.rss" "$raw.stop" &
    local sampler=$!
    local c0 c1 t0 t1 rc=0
    c0=$(cpu_ticks "${MEASURE_PIDS[@]}")
    t0=$(date +%s.%N)
    pin "$cpus" "${cmd[@]}" >"$raw.out" 2>&1 || rc=$?
    t1=$(date +%s.%N)
    c1=$(cpu_ticks "${MEASURE_PIDS[@]}")
    touch "$raw.stop"
    wait "$sampler" || true

    local requests=0 rps=0 p50=0 p99=0 errors=0 extra=""
    case $tool in
    wrk)
        local line
        line=$(grep '^RESULT ' "$raw.out" || true)
        if [[ -n $line ]]; then
            requests=$(sed -n 's/.* requests=\([0-9]*\).*/\1/p' <<<"$line")
            local dur bytes
            dur=$(sed -n 's/.* duration_us=\([0-9]*\).*/\1/p' <<<"$line")
            bytes=$(sed -n 's/.* bytes=\([0-9]*\).*/\1/p' <<<"$line")
            rps=$(awk -v n="$requests" -v d="$dur" 'BEGIN { printf "%.0f", (d > 0 ? n / (d / 1e6) : 0) }')
            p50=$(sed -n 's/.* p50_us=\([0-9]*\).*/\1/p' <<<"$line")
            p99=$(sed -n 's/.* p99_us=\([0-9]*\).*/\1/p' <<<"$line")
            errors=$(awk '{ for (i = 1; i <= NF; i++) if ($i ~ /^(non2xx|connect_err|read_err|write_err|timeout_err)=/) { split($i, a, "="); s += a[2] } } END { print s + 0 }' <<<"$line")
            R[$key|mibps]=$(awk -v b="$bytes" -v d="$dur" 'BEGIN { printf "%.0f", (d > 0 ? b / 1048576 / (d / 1e6) : 0) }')
        fi
        ;;
    h2load)
        local fin reqline
        fin=$(grep '^finished in' "$raw.out" || true)
        reqline=$(grep '^requests:' "$raw.out" || true)
        if [[ -n $fin && -n $reqline ]]; then
            rps=$(sed -n 's/^finished in [^,]*, \([0-9.]*\) req\/s.*/\1/p' <<<"$fin" | awk '{ printf "%.0f", $1 }')
            requests=$(sed -n 's/.* \([0-9]*\) done,.*/\1/p' <<<"$reqline")
            local failed errored timeout non2xx
            failed=$(sed -n 's/.* \([0-9]*\) failed,.*/\1/p' <<<"$reqline")
            errored=$(sed -n 's/.* \([0-9]*\) errored,.*/\1/p' <<<"$reqline")
            timeout=$(sed -n 's/.* \([0-9]*\) timeout.*/\1/p' <<<"$reqline")
            non2xx=$(grep '^status codes:' "$raw.out" | sed -n 's/.*2xx, \([0-9]*\) 3xx, \([0-9]*\) 4xx, \([0-9]*\) 5xx.*/\1 \2 \3/p' | awk '{ print $1 + $2 + $3 }')
            errors=$((failed + errored + timeout + ${non2xx:-0}))
            if [[ -s $raw.requests.log ]]; then
                read -r p50 p99 < <(cut -f3 "$raw.requests.log" | sort -n |
                    awk '{ v[NR] = $1 } END { if (NR == 0) { print 0, 0; exit }
                         i50 = int(NR * 0.50); if (i50 < 1) i50 = 1
                         i99 = int(NR * 0.99); if (i99 < 1) i99 = 1
                         print v[i50], v[i99] }')
            fi
        fi
        ;;
    hsload)
        local line
        line=$(grep '^RESULT ' "$raw.out" || true)
        if [[ -n $line ]]; then
            requests=$(sed -n 's/.* requests=\([0-9]*\).*/\1/p' <<<"$line")
            rps=$(sed -n 's/.* rps=\([0-9.]*\).*/\1/p' <<<"$line" | awk '{ printf "%.0f", $1 }')
            p50=$(sed -n 's/.* p50_us=\([0-9]*\).*/\1/p' <<<"$line")
            p99=$(sed -n 's/.* p99_us=\([0-9]*\).*/\1/p' <<<"$line")
            local e n r
            e=$(sed -n 's/.* errors=\([0-9]*\).*/\1/p' <<<"$line")
            n=$(sed -n 's/.* non2xx=\([0-9]*\).*/\1/p' <<<"$line")
            r=$(sed -n 's/.* resumed=\([0-9]*\).*/\1/p' <<<"$line")
            errors=$((e + n))
            R[$key|resumed]=$r
            R[$key|hs_p50]=$(sed -n 's/.* hs_p50_us=\([0-9]*\).*/\1/p' <<<"$line")
            R[$key|hs_p99]=$(sed -n 's/.* hs_p99_us=\([0-9]*\).*/\1/p' <<<"$line")
            R[$key|tls]=$(sed -n 's/.* \(proto=.*\)$/\1/p' <<<"$line")
        fi
        ;;
    esac
    if [[ -z $requests || $requests == 0 ]]; then
        log "  $target / $case produced no completed requests (exit $rc); output:"
        sed 's/^/    | /' "$raw.out" | tail -20 >&2
        requests=0
    fi
    local ticks=$((c1 - c0))
    R[$key|requests]=$requests
    R[$key|rps]=$rps
    R[$key|p50]=$p50
    R[$key|p99]=$p99
    R[$key|errors]=$errors
    R[$key|cpu_us]=$(awk -v t="$ticks" -v hz="$CLK_TCK" -v n="$requests" 'BEGIN { printf "%.1f", (n > 0 ? t * 1e6 / hz / n : 0) }')
    R[$key|cpu_pct]=$(awk -v t="$ticks" -v hz="$CLK_TCK" -v a="$t0" -v b="$t1" 'BEGIN { printf "%.0f", ((b - a) > 0 ? 100 * t / hz / (b - a) : 0) }')
    R[$key|rss]=$(cat "$raw.rss" 2>/dev/null || echo 0)
    CASES+=("$key")
    log "  -> ${requests} req, ${rps} req/s, p50 ${p50} us, p99 ${p99} us, errors ${errors}, proxy CPU ${R[$key|cpu_us]} us/req (${R[$key|cpu_pct]}%)"
}

# curl sanity checks; returns non-zero (with a message) when the proxy misbehaves.
check_proxy() {  # check_proxy NAME PORT
    local name=$1 port=$2 url="https://127.0.0.1:$2/small" code body ok=0
    code=$(curl -sk -o /dev/null -w '%{http_code}' "$url" || echo 000)
    [[ $code == 401 ]] || { log "$name: GET /small without a key gave HTTP $code (want 401)"; ok=1; }
    body=$(curl -sk --http1.1 -H "$APIKEY_HEADER" -w '|%{http_code}' "$url" || echo '|000')
    [[ $body == $'ok\n|200' ]] || { log "$name: HTTP/1.1 GET /small with the key gave '${body//$'\n'/\\n}' (want ok\\n|200)"; ok=1; }
    body=$(curl -sk --http2 -H "$APIKEY_HEADER" -w '|%{http_code}|%{http_version}' "$url" || echo '|000|')
    [[ $body == $'ok\n|200|2' ]] || { log "$name: HTTP/2 GET /small with the key gave '${body//$'\n'/\\n}' (want ok\\n|200|2)"; ok=1; }
    code=$(curl -sk -H "$APIKEY_HEADER" -o "$WORK/raw/$name-big.check" -w '%{http_code}' "https://127.0.0.1:$port/big" || echo 000)
    if [[ $code != 200 ]] || ! cmp -s "$WORK/raw/$name-big.check" "$WORK/www/big.bin"; then
        log "$name: GET /big gave HTTP $code or a different body"; ok=1
    fi
    return $ok
}

run_proxy_cases() {  # run_proxy_cases TARGET PORT
    local t=$1 port=$2
    run_case "$t" h1 wrk "$LOADGEN_CPUS" -- \
        wrk -t1 -c"$BENCH_CONNS" -d@DUR@s --timeout 5s -s "$BENCH_DIR/wrk-report.lua" \
        -H "$APIKEY_HEADER" "https://127.0.0.1:$port/small"
    run_case "$t" h2 h2load "$LOADGEN_CPUS" -- \
        h2load -t1 -c"$BENCH_CONNS" -m"$BENCH_H2_STREAMS" -D @DUR@ --log-file @LOG@ \
        -H "$APIKEY_HEADER" "https://127.0.0.1:$port/small"
    run_case "$t" hs hsload "$LOADGEN_CPUS" -- \
        "$HSLOAD_BIN" -p "$port" -c "$BENCH_HS_CONNS" -d @DUR@ -u /small -H "$APIKEY_HEADER"
    if [[ $BENCH_BIG == 1 ]]; then
        run_case "$t" big wrk "$LOADGEN_CPUS" -- \
            wrk -t1 -c"$BENCH_BIG_CONNS" -d@DUR@s --timeout 10s -s "$BENCH_DIR/wrk-report.lua" \
            -H "$APIKEY_HEADER" "https://127.0.0.1:$port/big"
    fi
}

declare -A IDLE_RSS PEAK_RSS MASTER_RSS LOG_LINES STATUS
FAILED_TARGETS=()

# ---------------------------------------------------------------- upstream
start_nginx "$WORK/upstream" "$UPSTREAM_CPU"
UPSTREAM_PID=$NGINX_PID
wait_port "$UPSTREAM_PORT" "$UPSTREAM_PID" || die "upstream nginx did not start: $(cat "$WORK/upstream/error.log" "$WORK/upstream/stdout.log" 2>/dev/null)"
[[ $(curl -s "http://127.0.0.1:$UPSTREAM_PORT/small") == ok ]] || die "upstream /small does not answer ok"
log "upstream nginx $NGINX_VER up on 127.0.0.1:$UPSTREAM_PORT (pid $UPSTREAM_PID)"

# ---------------------------------------------------------------- direct
if want direct; then
    MEASURE_PIDS=("$UPSTREAM_PID" $(pgrep -P "$UPSTREAM_PID"))
    RSS_PID=$(pgrep -P "$UPSTREAM_PID" | head -1)
    IDLE_RSS[direct]=$(status_kib "$RSS_PID" VmRSS)
    run_case direct h1 wrk "$DIRECT_LOADGEN_CPUS" -- \
        wrk -t1 -c"$BENCH_CONNS" -d@DUR@s --timeout 5s -s "$BENCH_DIR/wrk-report.lua" \
        -H "$APIKEY_HEADER" "http://127.0.0.1:$UPSTREAM_PORT/small"
    if [[ $BENCH_BIG == 1 ]]; then
        run_case direct big wrk "$DIRECT_LOADGEN_CPUS" -- \
            wrk -t1 -c"$BENCH_BIG_CONNS" -d@DUR@s --timeout 10s -s "$BENCH_DIR/wrk-report.lua" \
            -H "$APIKEY_HEADER" "http://127.0.0.1:$UPSTREAM_PORT/big"
    fi
    PEAK_RSS[direct]=$(status_kib "$RSS_PID" VmHWM)
    MASTER_RSS[direct]=$(status_kib "$UPSTREAM_PID" VmRSS)
fi

# ---------------------------------------------------------------- keygate
if want keygate; then
    "$KEYGATE_BIN" check -c "$WORK/keygate/keygate.toml" >"$WORK/keygate/check.out" 2>&1 ||
        log "keygate check -c keygate.toml failed: $(cat "$WORK/keygate/check.out")"
    pin_bg "$PROXY_CPU" "$KEYGATE_BIN" run -c "$WORK/keygate/keygate.toml" >"$WORK/keygate/keygate.log" 2>&1
    KEYGATE_PID=$BG_PID
    PIDS+=("$KEYGATE_PID")
    if ! wait_port "$KEYGATE_PORT" "$KEYGATE_PID"; then
        log "keygate did not start listening on $KEYGATE_PORT; its output:"
        tail -20 "$WORK/keygate/keygate.log" >&2
        FAILED_TARGETS+=("keygate: did not start (see log above)")
    else
        log "keygate up on 127.0.0.1:$KEYGATE_PORT (pid $KEYGATE_PID)"
        if ! check_proxy keygate "$KEYGATE_PORT"; then
            FAILED_TARGETS+=("keygate: sanity check failed (see messages above); numbers below may not be meaningful")
        fi
        MEASURE_PIDS=("$KEYGATE_PID")
        RSS_PID=$KEYGATE_PID
        IDLE_RSS[keygate]=$(status_kib "$KEYGATE_PID" VmRSS)
        run_proxy_cases keygate "$KEYGATE_PORT"
        PEAK_RSS[keygate]=$(status_kib "$KEYGATE_PID" VmHWM)
        KEYGATE_THREADS=$(ls "/proc/$KEYGATE_PID/task" 2>/dev/null | wc -l)
        # WARN/ERROR lines grouped by message, e.g. "3× WARN auth_failed".
        KEYGATE_WARNINGS=$(jq -Rr 'fromjson? | select(.level == "WARN" or .level == "ERROR")
                | "\(.level) \(.event // .msg // "?")"' "$WORK/keygate/keygate.log" |
            sort | uniq -c | sort -rn | head -8 | awk '{ n = $1; $1 = ""; printf "%s%d× %s", (NR > 1 ? "; " : ""), n, substr($0, 2) }')
        kill -0 "$KEYGATE_PID" 2>/dev/null || FAILED_TARGETS+=("keygate: process exited during the benchmark")
        LOG_LINES[keygate]=$(wc -l <"$WORK/keygate/keygate.log")
        kill -TERM "$KEYGATE_PID" 2>/dev/null || true
        wait "$KEYGATE_PID" 2>/dev/null || true
    fi
fi

# ---------------------------------------------------------------- nginx TLS proxy
if want nginx; then
    start_nginx "$WORK/nginx-proxy" "$PROXY_CPU"
    NGINX_PROXY_PID=$NGINX_PID
    wait_port "$NGINX_TLS_PORT" "$NGINX_PROXY_PID" || die "nginx proxy did not start: $(cat "$WORK/nginx-proxy/error.log" 2>/dev/null)"
    log "nginx TLS proxy up on 127.0.0.1:$NGINX_TLS_PORT (pid $NGINX_PROXY_PID)"
    check_proxy nginx "$NGINX_TLS_PORT" || FAILED_TARGETS+=("nginx: sanity check failed")
    MEASURE_PIDS=("$NGINX_PROXY_PID" $(pgrep -P "$NGINX_PROXY_PID"))
    RSS_PID=$(pgrep -P "$NGINX_PROXY_PID" | head -1)
    IDLE_RSS[nginx]=$(status_kib "$RSS_PID" VmRSS)
    : >"$WORK/nginx-proxy/access.log.mark"
    run_proxy_cases nginx "$NGINX_TLS_PORT"
    PEAK_RSS[nginx]=$(status_kib "$RSS_PID" VmHWM)
    MASTER_RSS[nginx]=$(status_kib "$NGINX_PROXY_PID" VmRSS)
    LOG_LINES[nginx]=$(wc -l <"$WORK/nginx-proxy/access.log")
    NGINX_REUSED=$(grep -c '"tls_reused":"r"' "$WORK/nginx-proxy/access.log" || true)
fi

# ---------------------------------------------------------------- report
ms() { awk -v u="$1" 'BEGIN { if (u == "" || u == 0) print "–"; else if (u < 10000) printf "%.2f", u / 1000; else printf "%.1f", u / 1000 }'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (a == "" || b == "" || b + 0 == 0 || a + 0 == 0) print "–"; else printf "%.2f×", a / b }'; }
has() { [[ -n ${R[$1|requests]:-} && ${R[$1|requests]} != 0 ]]; }

case_name() {
    case $1 in
    h1) echo "small, HTTP/1.1 keep-alive, ${BENCH_CONNS} conns (wrk)" ;;
    h2) echo "small, HTTP/2, ${BENCH_CONNS} conns × ${BENCH_H2_STREAMS} streams (h2load)" ;;
    hs) echo "small, new TLS conn + full handshake per request, ${BENCH_HS_CONNS} clients (hsload)" ;;
    big) echo "1 MiB body, HTTP/1.1 keep-alive, ${BENCH_BIG_CONNS} conns (wrk)" ;;
    esac
}

report() {
    local k t c
    echo "# keygate benchmark"
    echo
    echo "$(date -u +%Y-%m-%dT%H:%M:%SZ) · $(uname -sr) · ${NCPU} CPUs ($(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)) · nginx $NGINX_VER · $(wrk --version 2>&1 | awk 'NR == 1 { print $1, $2 }') · $(h2load --version 2>&1 | head -1)"
    echo
    echo "Each run ${BENCH_DURATION}s after ${BENCH_WARMUP}s warm-up; ${PIN_NOTE}. Proxies: keygate \`workers = 1\`, nginx \`worker_processes 1\`; both TLS with the same ECDSA P-256 certificate, X-API-Key check, upstream keep-alive, one access-log line per request to a file. \"CPU µs/req\" and \"CPU %\" are the proxy's utime+stime (for direct rows: the upstream nginx's) over the run; \"RSS\" is the largest VmRSS sampled during the run (nginx: the worker process)."
    echo
    if ((${#FAILED_TARGETS[@]})); then
        echo "**Problems:**"
        for t in "${FAILED_TARGETS[@]}"; do echo "- $t"; done
        echo
    fi
    echo "| server | case | req/s | p50 ms | p99 ms | errors | proxy CPU µs/req | proxy CPU % | RSS MiB |"
    echo "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    for k in "${CASES[@]}"; do
        t=${k%%|*} c=${k#*|}
        local rps=${R[$k|rps]}
        [[ $c == big ]] && rps="$rps (${R[$k|mibps]:-?} MiB/s)"
        local flag=""
        ((${R[$k|busy_before]:-0} > BENCH_IDLE_MAX)) && flag=" ⚠" && BUSY_FLAGGED=1
        echo "| $t$flag | $(case_name "$c") | $rps | $(ms "${R[$k|p50]}") | $(ms "${R[$k|p99]}") | ${R[$k|errors]} | ${R[$k|cpu_us]} | ${R[$k|cpu_pct]} | $(mib "${R[$k|rss]}") |"
    done
    echo
    echo "Memory (KiB → MiB): idle after start / peak (VmHWM at the end of its runs)."
    echo
    echo "| server | RSS idle MiB | RSS, ${BENCH_CONNS} busy conns (small HTTP/1.1) MiB | RSS, ${BENCH_CONNS} busy HTTP/2 conns MiB | peak RSS (VmHWM) MiB |"
    echo "| --- | ---: | ---: | ---: | ---: |"
    for t in direct keygate nginx; do
        [[ -n ${PEAK_RSS[$t]:-} ]] || continue
        echo "| $t | $(mib "${IDLE_RSS[$t]:-0}") | $(mib "${R[$t|h1|rss]:-0}") | $( [[ -n ${R[$t|h2|rss]:-} ]] && mib "${R[$t|h2|rss]}" || echo –) | $(mib "${PEAK_RSS[$t]}") |"
    done
    echo
    echo "## Ratios"
    echo
    echo "| comparison | case | req/s | p99 latency | proxy CPU µs/req |"
    echo "| --- | --- | ---: | ---: | ---: |"
    for c in h1 big; do
        if has "keygate|$c" && has "direct|$c"; then
            echo "| keygate / direct | $(case_name "$c") | $(ratio "${R[keygate|$c|rps]}" "${R[direct|$c|rps]}") | $(ratio "${R[keygate|$c|p99]}" "${R[direct|$c|p99]}") | $(ratio "${R[keygate|$c|cpu_us]}" "${R[direct|$c|cpu_us]}") |"
        fi
    done
    for c in h1 h2 hs big; do
        if has "keygate|$c" && has "nginx|$c"; then
            echo "| keygate / nginx | $(case_name "$c") | $(ratio "${R[keygate|$c|rps]}" "${R[nginx|$c|rps]}") | $(ratio "${R[keygate|$c|p99]}" "${R[nginx|$c|p99]}") | $(ratio "${R[keygate|$c|cpu_us]}" "${R[nginx|$c|cpu_us]}") |"
        fi
    done
    echo
    if has "keygate|hs" || has "nginx|hs"; then
        echo "CPU per full handshake (hsload row µs/req; \"handshake only\" = that minus the keep-alive HTTP/1.1 µs/req, i.e. TCP accept + TLS handshake + connection teardown):"
        echo
        echo "| server | CPU µs per connection+handshake+request | ≈ CPU µs per handshake only | client-side handshake p50 / p99 ms |"
        echo "| --- | ---: | ---: | ---: |"
        for t in keygate nginx; do
            has "$t|hs" || continue
            local only
            only=$(awk -v a="${R[$t|hs|cpu_us]}" -v b="${R[$t|h1|cpu_us]:-0}" 'BEGIN { printf "%.1f", a - b }')
            echo "| $t | ${R[$t|hs|cpu_us]} | $only | $(ms "${R[$t|hs|hs_p50]}") / $(ms "${R[$t|hs|hs_p99]}") |"
        done
        if has "keygate|hs" && has "nginx|hs"; then
            local kg ng
            kg=$(awk -v a="${R[keygate|hs|cpu_us]}" -v b="${R[keygate|h1|cpu_us]:-0}" 'BEGIN { print a - b }')
            ng=$(awk -v a="${R[nginx|hs|cpu_us]}" -v b="${R[nginx|h1|cpu_us]:-0}" 'BEGIN { print a - b }')
            echo "| keygate / nginx | $(ratio "${R[keygate|hs|cpu_us]}" "${R[nginx|hs|cpu_us]}") | $(ratio "$kg" "$ng") | |"
        fi
        echo
    fi
    echo "Notes:"
    [[ -n ${BUSY_FLAGGED:-} ]] && echo "- ⚠ = other processes kept the machine more than ${BENCH_IDLE_MAX}% busy right before that run (after waiting ${BENCH_WAIT_IDLE}s); its numbers are unreliable, rerun on a quiet machine."
    for t in keygate nginx; do
        has "$t|hs" && echo "- $t handshake run: ${R[$t|hs|tls]}, client-side resumed handshakes: ${R[$t|hs|resumed]} (must be 0)."
    done
    [[ -n ${NGINX_REUSED:-} ]] && echo "- nginx access log: ${NGINX_REUSED} requests on resumed TLS sessions in total (\$ssl_session_reused = r; the keep-alive tools may resume when they connect, hsload never does)."
    for t in keygate nginx; do
        [[ -n ${LOG_LINES[$t]:-} ]] && echo "- $t wrote ${LOG_LINES[$t]} log lines (access log) during the benchmark."
    done
    [[ -n ${KEYGATE_THREADS:-} ]] && echo "- keygate had ${KEYGATE_THREADS} threads at the end (\`workers = 1\` sets the async worker threads; all its threads were limited to the same CPU as nginx's single worker when pinned)."
    [[ -n ${KEYGATE_WARNINGS:-} ]] && echo "- keygate log, WARN/ERROR lines by message (the 401 sanity check causes one auth_failed): ${KEYGATE_WARNINGS}."
    for t in direct nginx; do
        [[ -n ${MASTER_RSS[$t]:-} ]] && echo "- $t: its nginx master process RSS $(mib "${MASTER_RSS[$t]}") MiB (not included above; mostly pages shared with the worker)."
    done
    echo "- latency: wrk and h2load measure from sending the request to the end of the response; hsload measures from connect() to the end of the response (TCP + full TLS handshake + request)."
    return 0
}

REPORT=$(report)
printf '%s\n' "$REPORT"
if [[ -n $BENCH_OUT ]]; then printf '%s\n' "$REPORT" >"$BENCH_OUT"; fi
if [[ $BENCH_KEEP == 1 ]]; then printf '%s\n' "$REPORT" >"$WORK/report.md"; fi
