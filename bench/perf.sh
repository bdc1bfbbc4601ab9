#!/usr/bin/env bash
# keygate vs nginx, by issue 10's method. One command, bounded run time:
#
#   bash bench/perf.sh                 # full run, ~12 minutes
#   PERF_QUICK=1 bash bench/perf.sh    # smoke run, ~3 minutes
#
# Same machine, nothing pinned. keygate `workers = 1` vs nginx `worker_processes 1`
# (then 2 vs 2), both TLS (same ECDSA P-256 certificate, TLS 1.3 as the client
# negotiates it) in front of the same upstream (nginx, one worker, 100-byte body).
# The figure that counts: CPU µs per request = utime+stime of the whole proxy
# process (all threads; nginx: master + workers) from /proc/PID/stat over the run,
# divided by the requests completed; median of PERF_REPS runs, proxies interleaved.
# Markdown report on stdout (progress on stderr). See bench/README.md, "perf.sh".
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PERF_DIR=$ROOT/bench/perf

: "${PERF_QUICK:=0}"
if [[ $PERF_QUICK == 1 ]]; then
    : "${PERF_N:=20000}" "${PERF_REPS:=1}" "${PERF_TPUT_SECS:=4}" "${PERF_TPUT_REPS:=1}"
    : "${PERF_HS_SECS:=3}" "${PERF_BIG_N:=200}"
fi
: "${PERF_N:=100000}"          # requests per CPU run (h2load -n)
: "${PERF_REPS:=2}"            # CPU runs per case and proxy (median)
: "${PERF_CONNS:=50}"          # h2load -c
: "${PERF_STREAMS:=10}"        # h2load -m for HTTP/2
: "${PERF_TPUT_SECS:=15}"      # seconds per throughput run
: "${PERF_TPUT_REPS:=3}"       # throughput runs per case and proxy
: "${PERF_HS_SECS:=10}"        # seconds per full-handshake run
: "${PERF_HS_CONNS:=10}"       # hsload clients
: "${PERF_BIG_N:=1000}"        # 1 MiB responses per big-body run (h2load --h1, PERF_CONNS conns)
: "${PERF_WORKERS2:=1}"        # 1: also compare workers = 2 with worker_processes 2
: "${PERF_CASES:=cpu tput hs big}"  # which parts of the workers = 1, logs off setting run
: "${PERF_LOG_ON:=1}"          # 1: also measure with access logs on
: "${PERF_BUILD:=1}"           # 1: cargo build --release keygate and bench/hsload first
: "${PERF_KEEP:=0}"            # 1: keep the work dir
: "${PERF_OUT:=}"              # also write the report here
: "${PERF_PORT_BASE:=18000}"   # upstream PORT_BASE, keygate +443, nginx +444
: "${CARGO_TARGET_DIR:=$ROOT/target}"
: "${KEYGATE_BIN:=$CARGO_TARGET_DIR/release/keygate}"
HSLOAD_DIR=$CARGO_TARGET_DIR/bench-hsload
HSLOAD_BIN=$HSLOAD_DIR/release/hsload
UPSTREAM_PORT=$PERF_PORT_BASE
KEYGATE_PORT=$((PERF_PORT_BASE + 443))
NGINX_PORT=$((PERF_PORT_BASE + 444))
RUN_TIMEOUT=300                # no single load run may take longer than this

log() { printf '[perf] %s\n' "$*" >&2; }
die() { printf '[perf] ERROR: %s\n' "$*" >&2; exit 1; }

# ---------------------------------------------------------------- prerequisites
need=()
for tp in nginx:nginx h2load:nghttp2-client openssl:openssl curl:curl jq:jq ss:iproute2; do
    command -v "${tp%%:*}" >/dev/null 2>&1 || need+=("${tp#*:}")
done
if ((${#need[@]})); then
    [[ $(id -u) == 0 ]] || die "missing packages: ${need[*]}"
    log "installing ${need[*]}"
    apt-get update -q >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need[@]}" >&2
fi
for port in "$UPSTREAM_PORT" "$KEYGATE_PORT" "$NGINX_PORT"; do
    ss -Hltn "sport = :$port" | grep -q . && die "port $port in use (set PERF_PORT_BASE)"
done
if [[ $PERF_BUILD == 1 ]]; then
    log "building keygate and bench/hsload (release)"
    (cd "$ROOT" && cargo build --release -q --bin keygate) >&2
    (cd "$ROOT/bench/hsload" && { cargo build --release --offline -q --target-dir "$HSLOAD_DIR" 2>/dev/null ||
        cargo build --release -q --target-dir "$HSLOAD_DIR"; }) >&2
fi
[[ -x $KEYGATE_BIN ]] || die "$KEYGATE_BIN missing"
[[ " $PERF_CASES " != *" hs "* || -x $HSLOAD_BIN ]] || die "$HSLOAD_BIN missing (PERF_BUILD=1 builds it)"
HZ=$(getconf CLK_TCK)
T_BEGIN=$(date +%s)
UPTIME_BEGIN=$(uptime)

# ---------------------------------------------------------------- work dir
WORK=$(mktemp -d /tmp/keygate-perf.XXXXXX)
chmod 711 "$WORK"
PIDS=()
cleanup() {
    local rc=$? p
    trap - EXIT INT TERM
    for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
    if [[ $PERF_KEEP == 1 ]]; then log "kept $WORK"; else rm -rf "$WORK"; fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
mkdir -p "$WORK"/{tls,www,upstream/tmp,raw}
chmod 755 "$WORK/www"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
    -keyout "$WORK/tls/key.pem" -out "$WORK/tls/cert.pem" -days 30 \
    -subj /CN=localhost -addext subjectAltName=DNS:localhost,IP:127.0.0.1 2>/dev/null
head -c 1048576 /dev/urandom >"$WORK/www/big.bin"
chmod 644 "$WORK/www/big.bin"
KEYJSON=$("$KEYGATE_BIN" keygen --id bench --json)
TOKEN=$(jq -er .token <<<"$KEYJSON")
HASH=$(jq -er .hash <<<"$KEYJSON")
KEYH="X-API-Key: $TOKEN"
BODY100=$(printf 'x%.0s' $(seq 99))'\n'

NGINX_VER=$(nginx -v 2>&1 | sed -n 's#.*nginx/\([0-9.]*\).*#\1#p')
if printf '%s\n1.25.1\n' "$NGINX_VER" | sort -V -C && [[ $NGINX_VER != 1.25.1 ]]; then
    LISTEN_HTTP2=http2 HTTP2_ON=""
else
    LISTEN_HTTP2="" HTTP2_ON="http2 on;"
fi

esc() { printf '%s' "$1" | sed -e 's/[\\&#]/\\&/g'; }
render() {  # render TEMPLATE OUT DIR PORT WORKERS LEVEL ACCESS_LOG
    sed -e "s#@WORK@#$(esc "$WORK")#g" -e "s#@DIR@#$(esc "$3")#g" \
        -e "s#@PORT@#$4#g" -e "s#@WORKERS@#$5#g" -e "s#@LEVEL@#$6#g" \
        -e "s#@ACCESS_LOG@#$(esc "$7")#g" \
        -e "s#@UPSTREAM_PORT@#$UPSTREAM_PORT#g" -e "s#@TOKEN@#$(esc "$TOKEN")#g" \
        -e "s#@HASH@#$(esc "$HASH")#g" -e "s#@BODY100@#$(esc "$BODY100")#g" \
        -e "s#@LISTEN_HTTP2@#$LISTEN_HTTP2#g" -e "s#@HTTP2_ON@#$HTTP2_ON#g" "$1" >"$2"
}

wait_port() {  # wait_port PORT PID
    local i
    for ((i = 0; i < 100; i++)); do
        kill -0 "$2" 2>/dev/null || return 1
        (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
        sleep 0.1
    done
    return 1
}
start_nginx() {  # start_nginx DIR -> NGINX_PID
    nginx -t -q -e "$1/error.log" -p "$1" -c "$1/nginx.conf" >&2 || die "nginx rejected $1/nginx.conf"
    nginx -e "$1/error.log" -p "$1" -c "$1/nginx.conf" >"$1/stdout.log" 2>&1 &
    NGINX_PID=$!
    PIDS+=("$NGINX_PID")
}
stop() {  # stop PID
    kill -TERM "$1" 2>/dev/null || true
    wait "$1" 2>/dev/null || true
}

# ---------------------------------------------------------------- measuring
ticks() {  # ticks PID... : "utime stime", clock ticks, summed over the processes
    local p s u=0 k=0
    local -a f
    for p in "$@"; do
        s=$(cat "/proc/$p/stat" 2>/dev/null) || continue
        s=${s##*) }
        read -r -a f <<<"$s"
        u=$((u + f[11])) k=$((k + f[12]))
    done
    echo "$u $k"
}
kib() { awk -v k="$2" '$1 == k":" { print $2 }' "/proc/$1/status" 2>/dev/null || echo 0; }
mib() { awk -v k="$1" 'BEGIN { printf "%.1f", k / 1024 }'; }
# The processes whose CPU counts, and the one whose RSS counts (nginx: the workers).
cpu_pids() { if [[ $1 == keygate ]]; then echo "$KG_PID"; else echo "$NG_PID $(pgrep -P "$NG_PID" | tr '\n' ' ')"; fi; }
rss_pids() { if [[ $1 == keygate ]]; then echo "$KG_PID"; else pgrep -P "$NG_PID" | tr '\n' ' '; fi; }
port_of() { if [[ $1 == keygate ]]; then echo "$KEYGATE_PORT"; else echo "$NGINX_PORT"; fi; }
rss_sum() { local p t=0; for p in "$@"; do t=$((t + $(kib "$p" VmRSS))); done; echo "$t"; }

# sample_rss FILE PID...: background sampler of the summed VmRSS (KiB), max kept in FILE.
sample_rss() {
    local f=$1 max=0 cur
    shift
    while :; do
        cur=$(rss_sum "$@")
        ((cur > max)) && max=$cur && echo "$max" >"$f"
        sleep 0.1
    done
}

declare -A R
# run PROXY TAG KIND ARGS... ; KIND: h2load or hsload. Sets R[TAG|PROXY|*].
run() {
    local proxy=$1 tag=$2 kind=$3
    shift 3
    local port raw c0 c1 t0 t1 sampler req=0 fail=0 rps=0 extra=""
    port=$(port_of "$proxy")
    raw=$WORK/raw/${tag//|/-}-$proxy-$((++RUN_NO))
    # shellcheck disable=SC2046
    sample_rss "$raw.rss" $(rss_pids "$proxy") &
    sampler=$!
    # shellcheck disable=SC2046
    c0=$(ticks $(cpu_pids "$proxy"))
    t0=$(date +%s.%N)
    local la
    la=$(cut -d' ' -f1 /proc/loadavg)
    if [[ $kind == h2load ]]; then
        timeout "$RUN_TIMEOUT" h2load "$@" ${LAT:+--log-file "$raw.lat"} -H "$KEYH" "https://127.0.0.1:$port${URLPATH:-/small}" >"$raw.out" 2>&1 || true
    else
        timeout "$RUN_TIMEOUT" "$HSLOAD_BIN" -p "$port" "$@" -u /small -H "$KEYH" >"$raw.out" 2>&1 || true
    fi
    t1=$(date +%s.%N)
    # Let the proxy finish its own work (keygate writes log lines on a writer thread).
    sleep 0.5
    # shellcheck disable=SC2046
    c1=$(ticks $(cpu_pids "$proxy"))
    kill "$sampler" 2>/dev/null || true
    wait "$sampler" 2>/dev/null || true
    if [[ $kind == h2load ]]; then
        # "requests: 100000 total, 100000 started, 100000 done, 100000 succeeded, 0 failed, 0 errored, 0 timeout"
        req=$(sed -n 's/^requests: .* \([0-9]*\) succeeded.*/\1/p' "$raw.out")
        fail=$(sed -n 's/^requests: .* succeeded, \([0-9]*\) failed, \([0-9]*\) errored.*/\1+\2/p' "$raw.out")
        fail=$((${fail:-0}))
        local non2xx
        non2xx=$(sed -n 's/^status codes: [0-9]* 2xx, \([0-9]*\) 3xx, \([0-9]*\) 4xx, \([0-9]*\) 5xx.*/\1+\2+\3/p' "$raw.out")
        fail=$((fail + ${non2xx:-0}))
        rps=$(sed -n 's/^finished in .*, \([0-9.]*\) req\/s.*/\1/p' "$raw.out")
        R[$tag|$proxy|tls]=$(awk -F': ' '/^TLS Protocol/ { p = $2 } /^Cipher/ { c = $2 } /^Server Temp Key/ { k = $2 } END { print p " " c " " k }' "$raw.out")
        if [[ -s $raw.lat ]]; then
            # --log-file: start time, status, µs to the end of the response.
            extra=$(awk '{ print $3 }' "$raw.lat" | sort -n | awk '{ v[NR] = $1 } END { if (NR) printf "%d %d", v[int(NR * 0.5) + 1], v[int(NR * 0.99) + 1] }')
        fi
    else
        local line
        line=$(grep '^RESULT' "$raw.out" || true)
        req=$(sed -n 's/.* ok=\([0-9]*\).*/\1/p' <<<"$line")
        fail=$(( $(sed -n 's/.* non2xx=\([0-9]*\).*/\1/p' <<<"$line") + $(sed -n 's/.* errors=\([0-9]*\).*/\1/p' <<<"$line") ))
        rps=$(sed -n 's/.* rps=\([0-9.]*\).*/\1/p' <<<"$line")
        R[$tag|$proxy|resumed]=$(( ${R[$tag|$proxy|resumed]:-0} + $(sed -n 's/.* resumed=\([0-9]*\).*/\1/p' <<<"$line") ))
        R[$tag|$proxy|tls]=$(sed -n 's/.* \(proto=.*\)$/\1/p' <<<"$line")
    fi
    req=${req:-0}
    if ((req == 0)); then
        log "  $proxy $tag: no completed requests; output:"
        tail -15 "$raw.out" | sed 's/^/    | /' >&2
        R[$tag|$proxy|cpu]+=" NA"
        return 0
    fi
    local us du dk
    du=$(( ${c1% *} - ${c0% *} )) dk=$(( ${c1#* } - ${c0#* } ))
    us=$(awk -v t=$((du + dk)) -v hz="$HZ" -v n="$req" 'BEGIN { printf "%.2f", t * 1e6 / hz / n }')
    R[$tag|$proxy|cpu]+=" $us"
    R[$tag|$proxy|usr]+=" $(awk -v t="$du" -v hz="$HZ" -v n="$req" 'BEGIN { printf "%.2f", t * 1e6 / hz / n }')"
    R[$tag|$proxy|sys]+=" $(awk -v t="$dk" -v hz="$HZ" -v n="$req" 'BEGIN { printf "%.2f", t * 1e6 / hz / n }')"
    R[$tag|$proxy|rps]+=" $rps"
    R[$tag|$proxy|fail]=$(( ${R[$tag|$proxy|fail]:-0} + fail ))
    R[$tag|$proxy|load]+=" $la"
    local rss
    rss=$(cat "$raw.rss" 2>/dev/null || echo 0)
    ((rss > ${R[$tag|$proxy|rss]:-0})) && R[$tag|$proxy|rss]=$rss
    if [[ -n $extra ]]; then
        R[$tag|$proxy|p50]+=" ${extra% *}"
        R[$tag|$proxy|p99]+=" ${extra#* }"
    fi
    log "  $tag $proxy: $req ok, $fail failed, $rps req/s, CPU $us µs/req, peak RSS $(mib "$rss") MiB, load $la${extra:+, p50/p99 µs $extra}"
}

# median of the numbers given (mean of the middle two for an even count); "–" for none.
median() {
    local v
    v=$(printf '%s\n' "$@" | grep -E '^[0-9.]+$' | sort -g) || true
    [[ -z $v ]] && { echo "–"; return; }
    awk '{ a[NR] = $1 } END { if (NR % 2) printf "%.2f", a[(NR + 1) / 2]; else printf "%.2f", (a[NR / 2] + a[NR / 2 + 1]) / 2 }' <<<"$v"
}
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (a + 0 == 0 || b + 0 == 0) print "–"; else printf "%.2f×", a / b }'; }

# The two proxies, started side by side (the idle one costs nothing) for one setting.
start_proxies() {  # start_proxies WORKERS LOGMODE(off|on) WARMUP(h1|h2|none) [SET-SUFFIX]
    local w=$1 mode=$2 warm=$3 level=warn alog="access_log off;"
    SET=w$w-$mode
    local dirs=$SET${4:-}
    local kd=$WORK/kg-$dirs nd=$WORK/ng-$dirs
    KG_DIR=$kd NG_DIR=$nd
    mkdir -p "$kd" "$nd/tmp"
    if [[ $mode == on ]]; then level=info alog="access_log $nd/access.log keygate;"; fi
    render "$PERF_DIR/keygate.toml.in" "$kd/keygate.toml" "$kd" "$KEYGATE_PORT" "$w" "$level" ""
    render "$PERF_DIR/proxy.nginx.conf.in" "$nd/nginx.conf" "$nd" "$NGINX_PORT" "$w" "" "$alog"
    "$KEYGATE_BIN" run -c "$kd/keygate.toml" >"$kd/access.log" 2>"$kd/stderr.log" &
    KG_PID=$!
    PIDS+=("$KG_PID")
    start_nginx "$nd"
    NG_PID=$NGINX_PID
    wait_port "$KEYGATE_PORT" "$KG_PID" || die "keygate did not start: $(tail -5 "$kd/access.log" "$kd/stderr.log")"
    wait_port "$NGINX_PORT" "$NG_PID" || die "nginx proxy did not start: $(tail -5 "$nd/error.log")"
    sleep 0.3
    R[$SET|keygate|idle0]=${R[$SET|keygate|idle0]:-$(rss_sum "$KG_PID")}
    # shellcheck disable=SC2046
    R[$SET|nginx|idle0]=${R[$SET|nginx|idle0]:-$(rss_sum $(rss_pids nginx))}
    local p port code body
    for p in keygate nginx; do
        port=$(port_of $p)
        code=$(curl -sk -o /dev/null -w '%{http_code}' "https://127.0.0.1:$port/small" || echo 000)
        [[ $code == 401 ]] || die "$p: no key gave HTTP $code, want 401"
        for v in --http1.1 --http2; do
            body=$(curl -sk $v -H "$KEYH" -w '%{http_code}' "https://127.0.0.1:$port/small" || echo 000)
            [[ ${#body} == 103 && $body == *200 ]] || die "$p $v: with the key gave '${body: -20}' (want 100 bytes + 200)"
        done
    done
    log "setting $dirs: keygate pid $KG_PID, nginx pid $NG_PID; warm-up $warm"
    local m=()
    case $warm in h1) m=(--h1) ;; h2) m=(-m "$PERF_STREAMS") ;; esac
    if [[ $warm != none ]]; then
        for p in keygate nginx; do
            timeout 60 h2load -n 2000 -c "$PERF_CONNS" "${m[@]}" -H "$KEYH" "https://127.0.0.1:$(port_of $p)/small" >/dev/null 2>&1 || true
        done
    fi
    # The key's first use ran argon2 (m_cost KiB of memory on an argon2 thread, freed after 1 s
    # without verifications): wait for that, so that peak RSS is the connections' memory.
    sleep 1.5
}
stop_proxies() {
    R[$SET|keygate|lines]=$(( ${R[$SET|keygate|lines]:-0} + $(wc -l <"$KG_DIR/access.log") ))
    R[$SET|nginx|lines]=$(( ${R[$SET|nginx|lines]:-0} + $({ cat "$NG_DIR/access.log" 2>/dev/null || true; } | wc -l) ))
    # RSS a few seconds after the load ended (does memory go back?).
    sleep 2
    R[$SET|keygate|after0]=$(rss_sum "$KG_PID")
    # shellcheck disable=SC2046
    R[$SET|nginx|after0]=$(rss_sum $(rss_pids nginx))
    stop "$KG_PID"
    stop "$NG_PID"
}

# Alternate which proxy goes first, rep by rep.
order() { if (($1 % 2)); then echo "nginx keygate"; else echo "keygate nginx"; fi; }

cpu_cases() {  # cpu_cases: h1 and h2, PERF_REPS each, interleaved
    local i p
    for ((i = 0; i < PERF_REPS; i++)); do
        for p in $(order "$i"); do run "$p" "$SET|h1" h2load -n "$PERF_N" -c "$PERF_CONNS" --h1; done
        for p in $(order $((i + 1))); do run "$p" "$SET|h2" h2load -n "$PERF_N" -c "$PERF_CONNS" -m "$PERF_STREAMS"; done
    done
}
tput_cases() {  # tput_cases h1|h2: PERF_TPUT_SECS each, PERF_TPUT_REPS interleaved, latency per request
    local i p m=(--h1) tag=t1
    [[ $1 == h2 ]] && m=(-m "$PERF_STREAMS") tag=t2
    for ((i = 0; i < PERF_TPUT_REPS; i++)); do
        for p in $(order "$i"); do
            LAT=1 run "$p" "$SET|$tag" h2load -D "$PERF_TPUT_SECS" -c "$PERF_CONNS" "${m[@]}"
        done
    done
}
RUN_NO=0

upstream_dir=$WORK/upstream
render "$PERF_DIR/upstream.nginx.conf.in" "$upstream_dir/nginx.conf" "$upstream_dir" "" "" "" ""
start_nginx "$upstream_dir"
UP_PID=$NGINX_PID
wait_port "$UPSTREAM_PORT" "$UP_PID" || die "upstream nginx did not start"
[[ $(curl -s "http://127.0.0.1:$UPSTREAM_PORT/small" | wc -c) == 100 ]] || die "upstream /small is not 100 bytes"
log "work dir $WORK; upstream nginx $NGINX_VER on $UPSTREAM_PORT; keygate $KEYGATE_PORT, nginx proxy $NGINX_PORT"

# 1. workers = 1, logs off: CPU, throughput/latency/RSS, handshakes, 1 MiB bodies.
want() { [[ " $PERF_CASES " == *" $1 "* ]]; }
start_proxies 1 off h2
R[w1-off|keygate|idle]=${R[w1-off|keygate|idle0]} R[w1-off|nginx|idle]=${R[w1-off|nginx|idle0]}
want cpu && cpu_cases
if want hs; then for p in $(order 0); do run "$p" "$SET|hs" hsload -c "$PERF_HS_CONNS" -d "$PERF_HS_SECS"; done; fi
stop_proxies
# Memory is measured in fresh processes, one per case, so that one case's heap does not
# show up as another's peak (an allocator keeps freed memory for reuse).
if want tput; then
    start_proxies 1 off h1 -t1; tput_cases h1; stop_proxies
    start_proxies 1 off h2 -t2; tput_cases h2; stop_proxies
fi
if want big; then
    start_proxies 1 off none -big
    for p in $(order 1); do URLPATH=/big run "$p" "$SET|big" h2load -n "$PERF_BIG_N" -c "$PERF_CONNS" --h1; done
    stop_proxies
    R[w1-off|keygate|after]=${R[w1-off|keygate|after0]} R[w1-off|nginx|after]=${R[w1-off|nginx|after0]}
fi
# 2. workers = 1, logs on.
if [[ $PERF_LOG_ON == 1 ]]; then
    start_proxies 1 on h1
    cpu_cases
    stop_proxies
fi
# 3. workers = 2 vs worker_processes 2, logs off.
if [[ $PERF_WORKERS2 == 1 ]]; then
    start_proxies 2 off h1
    cpu_cases
    stop_proxies
fi
UPTIME_END=$(uptime)

# ---------------------------------------------------------------- report
# shellcheck disable=SC2086
med() { median ${R[$1]:-}; }
row() {  # row LABEL KEY-PREFIX FIELD [UNIT-NOTE]
    local n k
    n=$(med "$2|nginx|$3") k=$(med "$2|keygate|$3")
    echo "| $1 | $n | $k | $(ratio "$k" "$n") | ${R[$2|nginx|$3]:-} / ${R[$2|keygate|$3]:-} |"
}
report() {
    echo "# keygate vs nginx (bench/perf.sh, issue 10 method)"
    echo
    echo "$(date -u +%Y-%m-%dT%H:%M:%SZ) · $(uname -r) · $(nproc) CPUs · nginx $NGINX_VER · $(h2load --version | head -1) · keygate $("$KEYGATE_BIN" --version 2>/dev/null | head -1) ($(cd "$ROOT" && git rev-parse --short HEAD 2>/dev/null || echo '?'))"
    echo
    echo "Machine load (uptime) at start: \`${UPTIME_BEGIN#*load average: }\`; at end: \`${UPTIME_END#*load average: }\`. Nothing pinned. Run took $(( $(date +%s) - T_BEGIN )) s."
    echo "TLS as negotiated by h2load: ${R[w1-off|h1|keygate|tls]:-?} (keygate) / ${R[w1-off|h1|nginx|tls]:-?} (nginx)."
    echo
    echo "## CPU µs per request (utime+stime of the whole proxy process ÷ requests; median of $PERF_REPS, h2load -n $PERF_N -c $PERF_CONNS)"
    echo
    echo "| case | nginx | keygate | keygate / nginx | runs (nginx / keygate) |"
    echo "| --- | ---: | ---: | ---: | --- |"
    row "h1, logs off" "w1-off|h1" cpu
    row "h2 (-m $PERF_STREAMS), logs off" "w1-off|h2" cpu
    if [[ $PERF_LOG_ON == 1 ]]; then
        row "h1, logs on" "w1-on|h1" cpu
        row "h2 (-m $PERF_STREAMS), logs on" "w1-on|h2" cpu
    fi
    if [[ $PERF_WORKERS2 == 1 ]]; then
        row "h1, logs off, 2 workers" "w2-off|h1" cpu
        row "h2 (-m $PERF_STREAMS), logs off, 2 workers" "w2-off|h2" cpu
    fi
    row "full TLS handshake + 1 request + close (hsload -c $PERF_HS_CONNS)" "w1-off|hs" cpu
    row "1 MiB body, h1 (µs per 1 MiB response)" "w1-off|big" cpu
    echo
    echo "Of which user space / kernel (utime / stime, µs per request, medians; logs off, 1 worker):"
    echo
    echo "| case | nginx user | nginx kernel | keygate user | keygate kernel |"
    echo "| --- | ---: | ---: | ---: | ---: |"
    local c
    for c in h1 h2; do
        echo "| $c | $(med "w1-off|$c|nginx|usr") | $(med "w1-off|$c|nginx|sys") | $(med "w1-off|$c|keygate|usr") | $(med "w1-off|$c|keygate|sys") |"
    done
    echo
    echo "## Throughput ($PERF_TPUT_REPS × ${PERF_TPUT_SECS}s interleaved, $PERF_CONNS connections, logs off; medians)"
    echo
    echo "| case | nginx | keygate | keygate / nginx | runs (nginx / keygate) |"
    echo "| --- | ---: | ---: | ---: | --- |"
    row "h1 req/s" "w1-off|t1" rps
    row "h1 p50 µs" "w1-off|t1" p50
    row "h1 p99 µs" "w1-off|t1" p99
    row "h2 (-m $PERF_STREAMS) req/s" "w1-off|t2" rps
    row "h2 p50 µs" "w1-off|t2" p50
    row "h2 p99 µs" "w1-off|t2" p99
    row "CPU µs/req in the h1 throughput runs" "w1-off|t1" cpu
    row "CPU µs/req in the h2 throughput runs" "w1-off|t2" cpu
    echo
    echo "## Memory (MiB; keygate: the process; nginx: its worker(s), master not counted)"
    echo
    echo "| figure | nginx | keygate | keygate / nginx |"
    echo "| --- | ---: | ---: | ---: |"
    local s
    for s in "idle RSS after start|w1-off||idle" "peak RSS, $PERF_CONNS h1 conns|w1-off|t1|rss" \
             "peak RSS, $PERF_CONNS h2 conns × $PERF_STREAMS streams|w1-off|t2|rss" \
             "peak RSS, 1 MiB bodies, $PERF_CONNS h1 conns|w1-off|big|rss" \
             "RSS 2 s after the 1 MiB load ended|w1-off||after"; do
        IFS='|' read -r label set c f <<<"$s"
        local key=$set${c:+|$c}
        local n=${R[$key|nginx|$f]:-0} k=${R[$key|keygate|$f]:-0}
        echo "| $label | $(mib "$n") | $(mib "$k") | $(ratio "$k" "$n") |"
    done
    echo
    echo "Notes:"
    echo "- failed/non-2xx responses (must be 0): $(for k in "${!R[@]}"; do [[ $k == *'|fail' && ${R[$k]} != 0 ]] && printf '%s=%s ' "$k" "${R[$k]}"; done)"
    echo "- handshake runs: client-side resumed handshakes keygate ${R[w1-off|hs|keygate|resumed]:-?}, nginx ${R[w1-off|hs|nginx|resumed]:-?} (must be 0); ${R[w1-off|hs|keygate|tls]:-}."
    [[ $PERF_LOG_ON == 1 ]] && echo "- log lines written with logs on: keygate ${R[w1-on|keygate|lines]}, nginx ${R[w1-on|nginx|lines]}; with logs off: keygate ${R[w1-off|keygate|lines]}, nginx ${R[w1-off|nginx|lines]}."
    echo "- 1-minute load average at the start of each CPU run, h1 logs off (nginx / keygate):${R[w1-off|h1|nginx|load]:-} /${R[w1-off|h1|keygate|load]:-}."
    return 0
}
REPORT=$(report)
printf '%s\n' "$REPORT"
[[ -n $PERF_OUT ]] && printf '%s\n' "$REPORT" >"$PERF_OUT"
exit 0
