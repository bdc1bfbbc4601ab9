#!/usr/bin/env bash
# Memory figure for per-client-IP state (issue 3): keygate's RSS (VmRSS from /proc) after start,
# after failed authentications from MEM_IPS distinct client addresses (trusted-proxy
# X-Forwarded-For, 10.0.0.0/8; unknown-key tokens, which count towards failed_auth_limit like any
# guess but cost no argon2 work), after the periodic prune (the housekeeping task runs every
# 60 s), and the same again for each further round of MEM_IPS *new* addresses (memory is reused,
# not grown).
#
# Usage: bash bench/memory_ips.sh   (env: MEM_IPS=100000 per round, MEM_ROUNDS=3, MEM_CONNS=8,
#                                    MEM_LIMIT="20/min" for failed_auth_limit, MEM_LOG_LEVEL=info,
#                                    MEM_PORT, MEM_UPSTREAM_PORT, MEM_KEEP=1 keeps the temp dir)
# Takes about a minute per round (each waits for a prune). Loopback only, bounded loops.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
: "${MEM_IPS:=100000}"
: "${MEM_CONNS:=8}"
: "${MEM_PORT:=18444}"
: "${MEM_UPSTREAM_PORT:=18001}"
: "${MEM_KEEP:=0}"
: "${MEM_LIMIT:=20/min}"
: "${MEM_ROUNDS:=3}"
: "${MEM_LOG_LEVEL:=info}"

log() { printf '[memory] %s\n' "$*" >&2; }
die() { printf '[memory] ERROR: %s\n' "$*" >&2; exit 1; }
for t in openssl jq; do command -v $t >/dev/null || die "$t is needed"; done

cd "$ROOT"
log "building (release)"
cargo build --release -q --bin keygate --example flood >&2
KEYGATE=$ROOT/target/release/keygate
FLOOD=$ROOT/target/release/examples/flood

WORK=$(mktemp -d /tmp/keygate-mem.XXXXXX)
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    if [[ $MEM_KEEP == 1 ]]; then log "kept $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT

openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
    -keyout "$WORK/key.pem" -out "$WORK/cert.pem" -days 30 -subj /CN=localhost \
    -addext subjectAltName=DNS:localhost,IP:127.0.0.1 -addext basicConstraints=critical,CA:FALSE 2>/dev/null
HASH=$("$KEYGATE" keygen --id someone --json | jq -er .hash)

cat >"$WORK/keygate.toml" <<EOF
[server]
listen = "127.0.0.1:$MEM_PORT"
workers = 1

[tls]
cert = "$WORK/cert.pem"
key = "$WORK/key.pem"

[upstream]
url = "http://127.0.0.1:$MEM_UPSTREAM_PORT"

[auth]
failed_auth_limit = "$MEM_LIMIT"

[access]
trusted_proxies = ["127.0.0.1/32"]

[log]
format = "json"
level = "$MEM_LOG_LEVEL"

[[keys]]
id = "someone"
hash = '$HASH'
EOF

"$FLOOD" upstream "127.0.0.1:$MEM_UPSTREAM_PORT" 2>"$WORK/upstream.log" &
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
START=$(date +%s)
rss() { awk '/VmRSS/ {print $2}' "/proc/$KG_PID/status"; }
TCK=$(getconf CLK_TCK)
# keygate's CPU time so far (utime + stime), in seconds.
cpu() { awk -v t="$TCK" '{sub(/.*\) /, ""); printf "%.1f", ($12 + $13) / t}' "/proc/$KG_PID/stat"; }
# The housekeeping task prunes 60 s, 120 s, … after start; wait for the next one plus a margin.
wait_prune() {
    local now next
    now=$(($(date +%s) - START))
    next=$(((now / 60 + 1) * 60 + 3))
    log "waiting $((next - now)) s for the periodic prune"
    sleep $((next - now))
}

ROWS=()
ROWS+=("| after start | $(rss) | $(cpu) |")
"$FLOOD" ips --addr "127.0.0.1:$MEM_PORT" --ca "$WORK/cert.pem" --count 2000 --conns "$MEM_CONNS" \
    --offset 16000000 >/dev/null
ROWS+=("| after 2 000 failed auths (TLS, buffers, log writer warm) | $(rss) | $(cpu) |")
NOTES=()
for round in $(seq "$MEM_ROUNDS"); do
    log "round $round: $MEM_IPS new addresses"
    R=$("$FLOOD" ips --addr "127.0.0.1:$MEM_PORT" --ca "$WORK/cert.pem" --count "$MEM_IPS" \
        --conns "$MEM_CONNS" --offset $(((round - 1) * MEM_IPS)))
    NOTES+=("- round $round: $R")
    ROWS+=("| round $round: right after failed auths from $MEM_IPS new addresses | $(rss) | $(cpu) |")
    wait_prune
    ROWS+=("| round $round: after the periodic prune | $(rss) | $(cpu) |")
done

echo "## keygate memory: per-client-IP state"
echo
echo "keygate \`workers = 1\`, \`failed_auth_limit = \"$MEM_LIMIT\"\`, log level $MEM_LOG_LEVEL, trusted proxy 127.0.0.1, one unknown-key token per client address (X-Forwarded-For), $MEM_CONNS keep-alive connections."
echo
echo "| moment | keygate VmRSS KiB | keygate CPU s (cumulative) |"
echo "| --- | --- | --- |"
printf '%s\n' "${ROWS[@]}"
echo
printf '%s\n' "${NOTES[@]}"
echo "- peak RSS (VmHWM): $(awk '/VmHWM/ {print $2, $3}' "/proc/$KG_PID/status")"
echo "- auth_throttled events: $(grep -c '"event":"auth_throttled"' "$WORK/keygate.log" || true); table-full warnings: $(grep -c 'failed-auth table full' "$WORK/keygate.log" || true)"
