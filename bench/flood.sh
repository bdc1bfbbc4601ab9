#!/usr/bin/env bash
# The flood benchmark (SPEC §3 failed-auth throttling, issue 3): does a legitimate client keep
# working while an attacker floods keygate with wrong-secret tokens?
#
# Builds release, starts a tiny upstream (examples/flood.rs `upstream`) and keygate with
# `workers = 1`, `verify_concurrency = 1`, real OWASP argon2id parameters (keygate keygen) and
# trusted_proxies = 127.0.0.1 (so X-Forwarded-For can stand for many client addresses). Then
# `flood run` measures the legitimate client (one keep-alive connection, valid key, sequential
# requests) alone, and again during each of three floods of wrong-secret tokens (valid checksum,
# a new secret per request, FLOOD_CONNS connections, as fast as keygate answers):
#   one   all from one client IP (X-Forwarded-For 198.51.100.1): throttled after 20 failures
#   many  a new client IP per request: every attempt gets its argon2 run, bounded by
#         verify_concurrency
#   none  from the legitimate client's own IP (a NAT shared with the attacker)
# and prints a Markdown table: p50/p99 per phase, the ratio to the quiet phase, keygate's CPU %
# (utime+stime from /proc/PID/stat over the measurement, 100 % = one core) and its busiest
# threads, and the attacker's answers per second (each 401 is one argon2 verification).
#
# Each phase runs FLOOD_ROUNDS times, interleaved, and the medians are reported.
#
# Usage: bash bench/flood.sh     (env: FLOOD_REQUESTS, FLOOD_SECS, FLOOD_CONNS, FLOOD_ROUNDS,
#                                 FLOOD_PORT, FLOOD_UPSTREAM_PORT, FLOOD_KEEP=1 keeps the temp dir)
# Loopback only; every loop is bounded in count (FLOOD_REQUESTS) and time (FLOOD_SECS).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
: "${FLOOD_REQUESTS:=3000}"     # legitimate requests per phase (at most)
: "${FLOOD_SECS:=20}"           # seconds per phase (at most)
: "${FLOOD_CONNS:=8}"           # attacker connections
: "${FLOOD_ROUNDS:=5}"          # each phase this many times, interleaved; medians reported
: "${FLOOD_PORT:=18443}"
: "${FLOOD_UPSTREAM_PORT:=18000}"
: "${FLOOD_KEEP:=0}"

log() { printf '[flood] %s\n' "$*" >&2; }
die() { printf '[flood] ERROR: %s\n' "$*" >&2; exit 1; }
for t in openssl jq getconf; do command -v $t >/dev/null || die "$t is needed"; done

cd "$ROOT"
log "building (release)"
cargo build --release -q --bin keygate --example flood >&2
KEYGATE=$ROOT/target/release/keygate
FLOOD=$ROOT/target/release/examples/flood

WORK=$(mktemp -d /tmp/keygate-flood.XXXXXX)
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    if [[ $FLOOD_KEEP == 1 ]]; then log "kept $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT

openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
    -keyout "$WORK/key.pem" -out "$WORK/cert.pem" -days 30 -subj /CN=localhost \
    -addext subjectAltName=DNS:localhost,IP:127.0.0.1 -addext basicConstraints=critical,CA:FALSE 2>/dev/null
KEYJSON=$(cargo run --release -q -- keygen --id legit --json)
TOKEN=$(jq -er .token <<<"$KEYJSON")
HASH=$(jq -er .hash <<<"$KEYJSON")

cat >"$WORK/keygate.toml" <<EOF
[server]
listen = "127.0.0.1:$FLOOD_PORT"
workers = 1
max_connections = 4096

[tls]
cert = "$WORK/cert.pem"
key = "$WORK/key.pem"

[upstream]
url = "http://127.0.0.1:$FLOOD_UPSTREAM_PORT"

[auth]
failed_auth_limit = "20/min"
verify_concurrency = 1

[access]
trusted_proxies = ["127.0.0.1/32"]

[log]
format = "json"
level = "info"

[[keys]]
id = "legit"
hash = '$HASH'
EOF

"$FLOOD" upstream "127.0.0.1:$FLOOD_UPSTREAM_PORT" 2>"$WORK/upstream.log" &
PIDS+=($!)
"$KEYGATE" run -c "$WORK/keygate.toml" >"$WORK/keygate.log" 2>&1 &
KG_PID=$!
PIDS+=("$KG_PID")
for _ in $(seq 100); do
    grep -q '"msg":"listening"' "$WORK/keygate.log" 2>/dev/null && break
    kill -0 "$KG_PID" 2>/dev/null || die "keygate exited: $(cat "$WORK/keygate.log")"
    sleep 0.1
done
grep -q '"msg":"listening"' "$WORK/keygate.log" || die "keygate did not start"

log "measuring: quiet and three floods, $FLOOD_ROUNDS rounds (${FLOOD_SECS}s at most each)"
LOAD0=$(cut -d' ' -f1-3 /proc/loadavg)
echo "## keygate flood benchmark"
echo
echo "$(nproc) CPUs ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)); keygate \`workers = 1\`, \`verify_concurrency = 1\`, argon2id m=19456 KiB t=2 p=1, \`failed_auth_limit = \"20/min\"\`; legitimate client: one keep-alive HTTP/1.1 connection, ${FLOOD_REQUESTS} sequential requests at most; attacker: ${FLOOD_CONNS} keep-alive connections."
echo
"$FLOOD" run --addr "127.0.0.1:$FLOOD_PORT" --ca "$WORK/cert.pem" --token "$TOKEN" \
    --key-id legit --pid "$KG_PID" --requests "$FLOOD_REQUESTS" --secs "$FLOOD_SECS" \
    --conns "$FLOOD_CONNS" --rounds "$FLOOD_ROUNDS"
echo
echo "Load average before/after (other work on the machine skews latency): $LOAD0 / $(cut -d' ' -f1-3 /proc/loadavg)."
echo "keygate peak RSS: $(awk '/VmHWM/ {print $2, $3}' "/proc/$KG_PID/status")." \
    "argon2 verifications logged (bad_secret): $(grep -c '"reason":"bad_secret"' "$WORK/keygate.log" || true);" \
    "refused without hashing (auth_throttled): $(grep -c '"event":"auth_throttled"' "$WORK/keygate.log" || true)."
