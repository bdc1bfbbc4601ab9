#!/usr/bin/env bash
# TLS scan of keygate's listener with testssl.sh (SPEC §4, issue 5 part 2).
#
# Starts keygate (release build) on a loopback port with a throwaway self-signed certificate,
# runs testssl.sh against it and fails if any finding rated MEDIUM or worse remains, apart from
# those that only say the test certificate is not trusted (self-signed chain, no OCSP/CRL/CT,
# no CAA record, validity of a throwaway certificate).
#
# testssl.sh cannot send an API key, so every HTTP request it makes (header checks: HSTS,
# banners, cookies, BREACH) is answered by keygate itself with the 401 every unauthenticated
# client gets, carrying the headers every response carries; the upstream is never contacted
# and is left pointing at a closed port.
#
# Usage:  bash bench/testssl.sh
# Knobs:  TESTSSL_KEYS="ec rsa"   certificate key types to scan with, one scan each
#                                 (ec: ECDSA P-256 as `keygate init` makes; rsa: RSA 2048)
#         TESTSSL_MIN_VERSION=1.2 keygate's [tls] min_version
#         TESTSSL_PORT=18443      listener port (loopback)
#         TESTSSL_BUILD=1         cargo build --release first (0: use KEYGATE_BIN as is)
#         TESTSSL_OUT=DIR         keep the JSON results and keygate's log in DIR
#         KEYGATE_BIN=…           default target/release/keygate
# Exit:   0 clean, 1 findings (listed on stderr), 2 setup problem.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
: "${TESTSSL_KEYS:=ec rsa}"
: "${TESTSSL_MIN_VERSION:=1.2}"
: "${TESTSSL_PORT:=18443}"
: "${TESTSSL_BUILD:=1}"
: "${TESTSSL_OUT:=}"
: "${KEYGATE_BIN:=$ROOT/target/release/keygate}"

log() { printf '[testssl] %s\n' "$*" >&2; }
die() { printf '[testssl] ERROR: %s\n' "$*" >&2; exit 2; }

# Findings that only describe the throwaway certificate's trust, not keygate's TLS settings.
# testssl.sh ids; a regular expression over the whole id.
CERT_ONLY='^(cert_chain_of_trust|cert_trust|cert_expirationStatus|cert_notAfter|cert_validityPeriod|cert_revocation|cert_crlDistributionPoints|cert_ocspURL|OCSP_stapling|cert_mustStapleExtension|certificate_transparency|cert_caIssuers|DNS_CAArecord)( <cert#[0-9]+>)?$'

# ------------------------------------------------------------------------ prerequisites
need=()
command -v testssl >/dev/null 2>&1 || command -v testssl.sh >/dev/null 2>&1 || need+=(testssl.sh)
for tool_pkg in openssl:openssl jq:jq; do
    command -v "${tool_pkg%%:*}" >/dev/null 2>&1 || need+=("${tool_pkg#*:}")
done
if ((${#need[@]})); then
    [[ $(id -u) == 0 ]] || die "missing packages: ${need[*]} (install them, or run as root)"
    log "installing: ${need[*]}"
    apt-get update -q >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need[@]}" >&2
fi
TESTSSL=$(command -v testssl || command -v testssl.sh)

if [[ $TESTSSL_BUILD == 1 ]]; then
    log "building keygate (release)"
    (cd "$ROOT" && cargo build --release --quiet --bin keygate) >&2
fi
[[ -x $KEYGATE_BIN ]] || die "no keygate binary at $KEYGATE_BIN"

TMP=$(mktemp -d)
KG_PID=
cleanup() {
    if [[ -n $KG_PID ]]; then kill "$KG_PID" 2>/dev/null || true; wait "$KG_PID" 2>/dev/null || true; fi
    if [[ -n $TESTSSL_OUT ]]; then mkdir -p "$TESTSSL_OUT" && cp "$TMP"/*.json "$TMP"/*.log "$TESTSSL_OUT"/ 2>/dev/null || true; fi
    rm -rf "$TMP"
}
trap cleanup EXIT

# A port nobody listens on, for the upstream keygate never reaches here.
DEAD_UPSTREAM=http://127.0.0.1:9

make_cert() { # key type → cert.pem, key.pem in $TMP/$1
    local dir=$TMP/$1
    mkdir -p "$dir"
    local keyopt
    case $1 in
        ec) keyopt=(-newkey ec -pkeyopt ec_paramgen_curve:P-256) ;;
        rsa) keyopt=(-newkey rsa:2048) ;;
        *) die "unknown key type $1 (ec or rsa)" ;;
    esac
    openssl req -x509 "${keyopt[@]}" -nodes -sha256 -days 365 \
        -subj /CN=localhost -addext subjectAltName=DNS:localhost,IP:127.0.0.1 \
        -keyout "$dir/key.pem" -out "$dir/cert.pem" 2>/dev/null
}

start_keygate() { # key type
    local dir=$TMP/$1
    local token_json
    token_json=$("$KEYGATE_BIN" keygen --id testssl --json)
    cat >"$dir/keygate.toml" <<EOF
[server]
listen = "127.0.0.1:$TESTSSL_PORT"
workers = 2

[tls]
cert = "cert.pem"
key = "key.pem"
min_version = "$TESTSSL_MIN_VERSION"

[upstream]
url = "$DEAD_UPSTREAM"

[log]
format = "json"
level = "info"

[[keys]]
id = "testssl"
hash = "$(jq -r .hash <<<"$token_json")"
EOF
    "$KEYGATE_BIN" run -c "$dir/keygate.toml" >"$TMP/keygate-$1.log" 2>&1 &
    KG_PID=$!
    for _ in $(seq 100); do
        grep -q '"msg":"listening"' "$TMP/keygate-$1.log" 2>/dev/null && return 0
        kill -0 "$KG_PID" 2>/dev/null || { cat "$TMP/keygate-$1.log" >&2; die "keygate exited"; }
        sleep 0.1
    done
    die "keygate did not start"
}

stop_keygate() {
    kill "$KG_PID" 2>/dev/null || true
    wait "$KG_PID" 2>/dev/null || true
    KG_PID=
}

status=0
for kt in $TESTSSL_KEYS; do
    make_cert "$kt"
    start_keygate "$kt"
    json=$TMP/testssl-$kt.json
    log "scanning 127.0.0.1:$TESTSSL_PORT ($kt certificate, min_version $TESTSSL_MIN_VERSION)"
    # Exit status of testssl.sh counts findings; the JSON is what we judge.
    "$TESTSSL" --quiet --color 0 --warnings off --openssl-timeout 10 \
        --ip 127.0.0.1 --jsonfile "$json" "https://localhost:$TESTSSL_PORT/" \
        >"$TMP/testssl-$kt.log" 2>&1 || true
    stop_keygate
    [[ -s $json ]] || { cat "$TMP/testssl-$kt.log" >&2; die "testssl.sh produced no JSON"; }

    echo "## $kt certificate: findings rated LOW or worse"
    jq -r '.[] | select(.severity == "LOW" or .severity == "MEDIUM" or .severity == "HIGH" or .severity == "CRITICAL")
               | "\(.severity)\t\(.id)\t\(.finding)"' "$json" | sort -u
    bad=$(jq -r --arg skip "$CERT_ONLY" '.[]
            | select(.severity == "MEDIUM" or .severity == "HIGH" or .severity == "CRITICAL")
            | select(.id | test($skip) | not)
            | "\(.severity)\t\(.id)\t\(.finding)"' "$json" | sort -u)
    if [[ -n $bad ]]; then
        log "$kt certificate: findings rated MEDIUM or worse that are not about the test certificate:"
        printf '%s\n' "$bad" >&2
        status=1
    else
        log "$kt certificate: nothing rated MEDIUM or worse apart from the untrusted test certificate"
    fi
    # Scan errors (a test that could not run) are not a pass.
    scan_err=$(jq -r '.[] | select(.severity == "WARN" or .id == "scanProblem") | "\(.id)\t\(.finding)"' "$json" | sort -u)
    if [[ -n $scan_err ]]; then
        log "$kt certificate: testssl.sh reported problems running some checks:"
        printf '%s\n' "$scan_err" >&2
    fi
done
exit $status
