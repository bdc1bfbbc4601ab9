#!/usr/bin/env bash
# Streams 1 GiB up and 1 GiB down through keygate and reports keygate's peak RSS.
# Proves bodies are streamed, not buffered. Loopback only; takes ~30 s.
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE=${STREAM_BYTES:-1073741824}
UP_PORT=${UP_PORT:-18000}; KG_PORT=${KG_PORT:-18443}
cargo build --release --quiet --bin keygate --example upstream
work=$(mktemp -d); trap 'kill $(jobs -p) 2>/dev/null; rm -rf "$work"' EXIT
target/release/examples/upstream "127.0.0.1:$UP_PORT" 2>/dev/null &
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 -subj /CN=localhost \
  -addext "subjectAltName=DNS:localhost" -keyout "$work/key.pem" -out "$work/cert.pem" 2>/dev/null
KEY=$(target/release/keygate keygen --id stream --json)
TOKEN=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["token"])' "$KEY")
HASH=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["hash"])' "$KEY")
cat > "$work/kg.toml" <<TOML
[server]
listen = "127.0.0.1:$KG_PORT"
workers = 1
max_body_bytes = $((SIZE * 2))
[tls]
cert = "cert.pem"
key = "key.pem"
[upstream]
url = "http://127.0.0.1:$UP_PORT"
[[keys]]
id = "stream"
hash = "$HASH"
TOML
target/release/keygate run -c "$work/kg.toml" > "$work/kg.log" 2>&1 &
KG=$!
for _ in $(seq 50); do curl -sk "https://localhost:$KG_PORT/" -o /dev/null && break; sleep 0.1; done
rss() { awk '/VmRSS/{print $2}' /proc/$KG/status; }
hwm() { awk '/VmHWM/{print $2}' /proc/$KG/status; }
curl -s --cacert "$work/cert.pem" -H "X-API-Key: $TOKEN" "https://localhost:$KG_PORT/" -o /dev/null
echo "keygate RSS after first request: $(rss) KiB (peak $(hwm) KiB; includes one argon2 verification)"
start=$(date +%s.%N)
down=$(curl -s --cacert "$work/cert.pem" -H "X-API-Key: $TOKEN" "https://localhost:$KG_PORT/bytes?n=$SIZE" -o /dev/null -w '%{size_download}')
t1=$(date +%s.%N)
echo "download: $down bytes in $(echo "$t1 - $start" | bc) s; keygate RSS $(rss) KiB, peak $(hwm) KiB"
up=$(head -c "$SIZE" /dev/zero | curl -s --cacert "$work/cert.pem" -H "X-API-Key: $TOKEN" -H 'Expect:' \
     -T - "https://localhost:$KG_PORT/upload")
t2=$(date +%s.%N)
echo "upload: upstream counted $up bytes in $(echo "$t2 - $t1" | bc) s; keygate RSS $(rss) KiB, peak $(hwm) KiB"
[ "$down" = "$SIZE" ] && [ "$up" = "$SIZE" ] || { echo "FAIL: size mismatch"; exit 1; }
