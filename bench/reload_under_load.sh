#!/usr/bin/env bash
# Reload under load: steady authenticated traffic through keygate while it is sent SIGHUP ten
# times, alternating between two configs (one adds a second key, the other removes it).
# Target: zero failed requests (non-2xx responses + socket errors).
#
#   upstream  nginx (`return 200 "ok\n"`, 1 worker) in its own prefix dir, plain HTTP
#   keygate   target/release/keygate run, TLS, one API key for the load, admin listener
#   load      wrk (HTTP/1.1 keep-alive) and h2load (HTTP/2) at the same time
#
# Each reload is checked: keygate logs config_reloaded (not config_reload_failed), and the
# second key works exactly when the loaded config has it. Everything runs on loopback, in a
# temp dir that is removed at exit; the whole run takes about RELOADS * INTERVAL + 10 seconds.
#
# Usage: bash bench/reload_under_load.sh     (exit 0: no failures; 1: failures or a bad reload)
# Knobs: RELOADS (10), INTERVAL (1 s between SIGHUPs), CONNS (wrk connections, 16),
#        H2_CONNS / H2_STREAMS (h2load, 4 / 10), BUILD (1: cargo build --release first),
#        KEEP (1: keep the temp dir), UPSTREAM_PORT / KEYGATE_PORT / ADMIN_PORT (default: free
#        ports picked at start, so it can run next to other benchmarks).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
: "${RELOADS:=10}"
: "${INTERVAL:=1}"
: "${CONNS:=16}"
: "${H2_CONNS:=4}"
: "${H2_STREAMS:=10}"
: "${BUILD:=1}"
: "${KEEP:=0}"
: "${KEYGATE_BIN:=$ROOT/target/release/keygate}"
DURATION=$((RELOADS * INTERVAL + 4))   # load runs 2 s before the first and after the last reload

log() { printf '[reload] %s\n' "$*" >&2; }
die() { printf '[reload] ERROR: %s\n' "$*" >&2; exit 2; }

# ------------------------------------------------------------------ prerequisites
need=()
for tool_pkg in nginx:nginx wrk:wrk h2load:nghttp2-client openssl:openssl curl:curl ss:iproute2; do
    command -v "${tool_pkg%%:*}" >/dev/null 2>&1 || need+=("${tool_pkg#*:}")
done
if ((${#need[@]})); then
    [[ $(id -u) == 0 ]] || die "missing packages: ${need[*]}"
    log "installing: ${need[*]}"
    apt-get update -q >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need[@]}" >&2
fi
free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
: "${UPSTREAM_PORT:=$(free_port)}"
: "${KEYGATE_PORT:=$(free_port)}"
: "${ADMIN_PORT:=$(free_port)}"
while [[ $KEYGATE_PORT == "$UPSTREAM_PORT" ]]; do KEYGATE_PORT=$(free_port); done
while [[ $ADMIN_PORT == "$UPSTREAM_PORT" || $ADMIN_PORT == "$KEYGATE_PORT" ]]; do ADMIN_PORT=$(free_port); done
for port in "$UPSTREAM_PORT" "$KEYGATE_PORT" "$ADMIN_PORT"; do
    if ss -Hltn "sport = :$port" | grep -q .; then die "port $port is in use (set *_PORT)"; fi
done
if [[ $BUILD == 1 ]]; then
    log "cargo build --release"
    (cd "$ROOT" && cargo build --release -q) >&2
fi
[[ -x $KEYGATE_BIN ]] || die "$KEYGATE_BIN missing"

TMP=$(mktemp -d /tmp/keygate-reload.XXXXXX)
PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    if [[ $KEEP == 1 ]]; then log "kept $TMP"; else rm -rf "$TMP"; fi
}
trap cleanup EXIT

# ------------------------------------------------------------------ upstream
mkdir -p "$TMP/nginx/logs"
cat >"$TMP/nginx/nginx.conf" <<EOF
daemon off;
worker_processes 1;
pid $TMP/nginx/nginx.pid;
error_log $TMP/nginx/logs/error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    client_body_temp_path $TMP/nginx/body;
    proxy_temp_path $TMP/nginx/proxy;
    fastcgi_temp_path $TMP/nginx/fastcgi;
    uwsgi_temp_path $TMP/nginx/uwsgi;
    scgi_temp_path $TMP/nginx/scgi;
    keepalive_requests 1000000;
    server {
        listen 127.0.0.1:$UPSTREAM_PORT;
        location / { return 200 "ok\n"; }
    }
}
EOF
nginx -p "$TMP/nginx" -c "$TMP/nginx/nginx.conf" &
PIDS+=($!)

# ------------------------------------------------------------------ keygate
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
    -subj /CN=localhost -addext "subjectAltName=DNS:localhost,IP:127.0.0.1" \
    -keyout "$TMP/key.pem" -out "$TMP/cert.pem" 2>/dev/null
chmod 600 "$TMP/key.pem"
read -r TOKEN HASH < <("$KEYGATE_BIN" keygen --id load --json |
    python3 -c 'import json,sys; j=json.load(sys.stdin); print(j["token"], j["hash"])')
read -r EXTRA_TOKEN EXTRA_HASH < <("$KEYGATE_BIN" keygen --id extra --json |
    python3 -c 'import json,sys; j=json.load(sys.stdin); print(j["token"], j["hash"])')

write_config() { # $1: file, $2: 1 to include the second key
    {
        cat <<EOF
[server]
listen = "127.0.0.1:$KEYGATE_PORT"
workers = 2
[tls]
cert = "cert.pem"
key = "key.pem"
[upstream]
url = "http://127.0.0.1:$UPSTREAM_PORT"
[admin]
listen = "127.0.0.1:$ADMIN_PORT"
[log]
level = "info"

[[keys]]
id = "load"
hash = "$HASH"
EOF
        if [[ $2 == 1 ]]; then
            printf '\n[[keys]]\nid = "extra"\nhash = "%s"\n' "$EXTRA_HASH"
        fi
    } >"$1"
}
write_config "$TMP/without-extra.toml" 0
write_config "$TMP/with-extra.toml" 1
cp "$TMP/without-extra.toml" "$TMP/keygate.toml"
"$KEYGATE_BIN" check -c "$TMP/keygate.toml" >/dev/null

"$KEYGATE_BIN" run -c "$TMP/keygate.toml" >"$TMP/keygate.log" 2>&1 &
KG_PID=$!
PIDS+=("$KG_PID")
for _ in $(seq 100); do
    curl -sf "http://127.0.0.1:$ADMIN_PORT/readyz" >/dev/null 2>&1 && break
    kill -0 "$KG_PID" 2>/dev/null || { cat "$TMP/keygate.log" >&2; die "keygate exited"; }
    sleep 0.1
done
curl -sf "http://127.0.0.1:$ADMIN_PORT/readyz" >/dev/null || die "keygate not ready (upstream down?)"

status_with() { # $1: token → HTTP status of one request
    curl -s -o /dev/null -w '%{http_code}' --cacert "$TMP/cert.pem" \
        -H "X-API-Key: $1" "https://localhost:$KEYGATE_PORT/"
}
[[ $(status_with "$TOKEN") == 200 ]] || die "the load key does not work"
[[ $(status_with "$EXTRA_TOKEN") == 401 ]] || die "the extra key works before it is added"
# (That first request also put the load key in the verified cache: the load measures the proxy.)

# ------------------------------------------------------------------ load + reloads
URL="https://127.0.0.1:$KEYGATE_PORT/"
log "load for ${DURATION}s: wrk -c$CONNS (HTTP/1.1) + h2load -c$H2_CONNS -m$H2_STREAMS (HTTP/2); $RELOADS SIGHUPs every ${INTERVAL}s"
timeout $((DURATION + 15)) wrk -t1 -c"$CONNS" -d"${DURATION}s" --timeout 5s \
    -H "X-API-Key: $TOKEN" "$URL" >"$TMP/wrk.out" 2>&1 &
WRK_PID=$!
timeout $((DURATION + 15)) h2load -c"$H2_CONNS" -m"$H2_STREAMS" -D "$DURATION" -T 5 \
    -H "X-API-Key: $TOKEN" "$URL" >"$TMP/h2load.out" 2>&1 &
H2_PID=$!
PIDS+=("$WRK_PID" "$H2_PID")

reloaded() { grep -c '"event":"config_reloaded"' "$TMP/keygate.log" || true; }
failed_reloads() { grep -c '"event":"config_reload_failed"' "$TMP/keygate.log" || true; }
bad_reloads=0
sleep 2
for i in $(seq "$RELOADS"); do
    if ((i % 2)); then with=1; src=with-extra.toml; else with=0; src=without-extra.toml; fi
    before=$(reloaded)
    cp "$TMP/$src" "$TMP/keygate.toml.new" && mv "$TMP/keygate.toml.new" "$TMP/keygate.toml"
    kill -HUP "$KG_PID"
    for _ in $(seq 100); do
        (($(reloaded) > before || $(failed_reloads) > 0)) && break
        sleep 0.05
    done
    extra=$(status_with "$EXTRA_TOKEN")
    want=$([[ $with == 1 ]] && echo 200 || echo 401)
    if (($(reloaded) <= before)) || [[ $extra != "$want" ]]; then
        bad_reloads=$((bad_reloads + 1))
        log "reload $i ($src): NOT applied (extra key answered $extra, expected $want)"
    else
        log "reload $i ($src): applied (extra key -> $extra)"
    fi
    sleep "$INTERVAL"
done
wait "$WRK_PID" || true
wait "$H2_PID" || true

# ------------------------------------------------------------------ report
# wrk: "N requests in …", "Non-2xx or 3xx responses: N", "Socket errors: connect A, read B, write C, timeout D"
wrk_total=$(awk '/requests in/ {print $1}' "$TMP/wrk.out")
wrk_non2xx=$(awk -F': ' '/Non-2xx or 3xx/ {print $2}' "$TMP/wrk.out")
wrk_sock=$(awk '/Socket errors/ {gsub(",", ""); print $4 + $6 + $8 + $10}' "$TMP/wrk.out")
# h2load: "requests: N total, N started, N done, N succeeded, N failed, N errored, N timeout"
#         "status codes: N 2xx, N 3xx, N 4xx, N 5xx"
# ("failed" includes non-2xx/3xx answers and the "errored"/"timeout" network failures.)
h2_total=$(awk '/^requests:/ {print $8}' "$TMP/h2load.out")
h2_failed=$(awk '/^requests:/ {print $10}' "$TMP/h2load.out")
h2_non2xx=$(awk '/^status codes:/ {gsub(",", ""); print $5 + $7 + $9}' "$TMP/h2load.out")
: "${wrk_total:=0}" "${wrk_non2xx:=0}" "${wrk_sock:=0}" "${h2_total:=0}" "${h2_failed:=0}" "${h2_non2xx:=0}"
[[ $wrk_total == 0 ]] && { cat "$TMP/wrk.out" >&2; die "wrk produced no result"; }
[[ $h2_total == 0 ]] && { cat "$TMP/h2load.out" >&2; die "h2load produced no result"; }

metrics=$(curl -sf "http://127.0.0.1:$ADMIN_PORT/metrics")
m() { awk -v s="$1" 'index($0, s " ") == 1 {v = $2} END {print v + 0}' <<<"$metrics"; }
total=$((wrk_total + h2_total))
failed=$((wrk_non2xx + wrk_sock + h2_failed))

cat <<EOF
## keygate reload under load

| | requests | non-2xx | socket errors / failed |
| --- | ---: | ---: | ---: |
| wrk, HTTP/1.1, $CONNS connections | $wrk_total | $wrk_non2xx | $wrk_sock |
| h2load, HTTP/2, $H2_CONNS×$H2_STREAMS streams (done) | $h2_total | $h2_non2xx | $h2_failed (incl. non-2xx) |
| **total** | **$total** | | **failed: $failed** |

- Duration ${DURATION}s, $RELOADS SIGHUPs every ${INTERVAL}s (alternately adding and removing a second key).
- Reloads logged: $(reloaded) config_reloaded, $(failed_reloads) config_reload_failed; not applied as expected: $bad_reloads.
- keygate metrics: reloads success $(m 'keygate_config_reloads_total{result="success"}'), failure $(m 'keygate_config_reloads_total{result="failure"}'); 2xx for key "load" $(m 'keygate_requests_total{status_class="2xx",key_id="load"}'), 5xx $(m 'keygate_requests_total{status_class="5xx",key_id="load"}').
- keygate process: pid $KG_PID, still running: $(kill -0 "$KG_PID" 2>/dev/null && echo yes || echo NO).
EOF
if ((failed > 0 || bad_reloads > 0)) || [[ $(failed_reloads) != 0 ]]; then
    log "FAIL: $failed failed requests, $bad_reloads reloads not applied"
    tail -n 20 "$TMP/wrk.out" "$TMP/h2load.out" >&2
    exit 1
fi
log "OK: zero failed requests across $RELOADS reloads"
