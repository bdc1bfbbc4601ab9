#!/usr/bin/env bash
# Issue 9 §1: a legitimate client's FIRST authentication (its key not yet in the verified cache,
# so argon2 must run) while a distributed guesser floods keygate with wrong secrets.
#
# Starts a tiny upstream (examples/flood.rs `upstream`) and keygate with `workers = 1`,
# `verify_concurrency = 1`, `failed_auth_limit = "20/min"`, real OWASP argon2id hashes, and no
# trusted proxies: the attackers are real source addresses. ATTACKERS addresses
# (127.0.0.10 onwards, loopback, Linux) hold one connection each and send wrong-secret tokens
# (valid checksum, existing key id) at most one every INTERVAL_MS each (20/min is one per 3 s:
# every guess is under the per-address budget, so every one costs a hash unless refused).
# The legitimate client (127.0.0.2, the attackers' own /24; LEGIT=127.0.1.2 for another
# network) presents LEGIT_KEYS never-used keys one after another, each on a fresh connection,
# first QUIET of them with no attacker. Prints p50/p99/max of those first authentications and
# the attackers' answers per second (401 = one argon2 run; 503 = refused without hashing).
#
# Usage: bash bench/attack_auth.sh   (env: ATTACKERS=200, INTERVAL_MS=3100, SECS=60,
#        LEGIT_KEYS=110, QUIET=10, LEGIT=127.0.0.2, KEYGATE_BIN=path to compare another build,
#        FLOOD_BIN=path of the load generator, PORT=18543, UPSTREAM_PORT=18100, KEEP=1 keeps
#        the temp dir, BUILD=0 skips the build)
# Bounded: the measured phase ends after SECS or LEGIT_KEYS first authentications.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
: "${ATTACKERS:=200}"
: "${INTERVAL_MS:=3100}"
: "${SECS:=60}"
: "${LEGIT_KEYS:=110}"
: "${QUIET:=10}"
: "${LEGIT:=127.0.0.2}"
: "${PORT:=18543}"
: "${UPSTREAM_PORT:=18100}"
: "${KEEP:=0}"
: "${BUILD:=1}"

log() { printf '[attack_auth] %s\n' "$*" >&2; }
die() { printf '[attack_auth] ERROR: %s\n' "$*" >&2; exit 1; }
for t in openssl jq; do command -v $t >/dev/null || die "$t is needed"; done

cd "$ROOT"
if [[ $BUILD == 1 ]]; then
    log "building (release)"
    cargo build --release -q --bin keygate --example flood >&2
fi
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
KEYGATE=${KEYGATE_BIN:-$TARGET/release/keygate}
FLOOD=${FLOOD_BIN:-$TARGET/release/examples/flood}

WORK=$(mktemp -d /tmp/keygate-attack-auth.XXXXXX)
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    if [[ $KEEP == 1 ]]; then log "kept $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT

openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
    -keyout "$WORK/key.pem" -out "$WORK/cert.pem" -days 30 -subj /CN=localhost \
    -addext subjectAltName=DNS:localhost,IP:127.0.0.1 -addext basicConstraints=critical,CA:FALSE 2>/dev/null

cat >"$WORK/keygate.toml" <<TOML
[server]
listen = "127.0.0.1:$PORT"
workers = 1
max_connections = 4096

[tls]
cert = "$WORK/cert.pem"
key = "$WORK/key.pem"

[upstream]
url = "http://127.0.0.1:$UPSTREAM_PORT"

[auth]
failed_auth_limit = "20/min"
verify_concurrency = 1

[log]
format = "json"
level = "info"
TOML
log "making $((LEGIT_KEYS + 1)) keys (OWASP argon2id)"
for i in $(seq 0 "$LEGIT_KEYS"); do
    id=$([[ $i == 0 ]] && echo victim || echo "legit$i")
    j=$("$KEYGATE" keygen --id "$id" --json)
    [[ $i == 0 ]] || jq -er .token <<<"$j" >>"$WORK/tokens"
    printf '\n[[keys]]\nid = "%s"\nhash = '"'"'%s'"'"'\n' "$id" "$(jq -er .hash <<<"$j")" >>"$WORK/keygate.toml"
done

"$FLOOD" upstream "127.0.0.1:$UPSTREAM_PORT" 2>"$WORK/upstream.log" &
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

echo "## keygate: first authentication under a distributed guessing flood"
echo
echo "$(nproc) CPUs, load average $(cut -d' ' -f1-3 /proc/loadavg) at start; keygate $("$KEYGATE" --version | cut -d' ' -f2) ($KEYGATE), \`workers = 1\`, \`verify_concurrency = 1\`, \`failed_auth_limit = \"20/min\"\`, argon2id m=19456 KiB t=2 p=1; legitimate client at $LEGIT."
echo
"$FLOOD" distributed --addr "127.0.0.1:$PORT" --ca "$WORK/cert.pem" --key-id victim \
    --tokens "$WORK/tokens" --pid "$KG_PID" --attackers "$ATTACKERS" --first 10 \
    --interval-ms "$INTERVAL_MS" --secs "$SECS" --legit "$LEGIT" --quiet "$QUIET"
echo
echo "Log lines: $(wc -l <"$WORK/keygate.log") ($(du -k "$WORK/keygate.log" | cut -f1) KiB); auth_failed lines $(grep -c '"event":"auth_failed"' "$WORK/keygate.log" || true), log_suppressed summaries $(grep -c '"event":"log_suppressed"' "$WORK/keygate.log" || true). Load average at end $(cut -d' ' -f1-3 /proc/loadavg)."
