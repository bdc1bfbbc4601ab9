#!/bin/sh
# Make a self-signed TLS certificate for local development and testing of keygate.
#
# Usage: certs/make-dev-cert.sh [-f] [OUTDIR] [NAME...]
#   OUTDIR  where to write cert.pem and key.pem (default: current directory; created if missing)
#   NAME    extra subjectAltNames besides localhost, 127.0.0.1 and ::1: DNS names
#           (api.dev.test, *.dev.test) or IPv4/IPv6 addresses (192.168.1.20, fd00::5)
#   -f      overwrite an existing cert.pem / key.pem in OUTDIR
#
# The result: an ECDSA P-256 key (PKCS#8 PEM, mode 600) and a self-signed certificate valid for
# 30 days. NOT for production: clients must be told to trust it explicitly
# (curl --cacert OUTDIR/cert.pem ...). Never commit key.pem.
set -eu

usage() { sed -n '2,13s/^# \{0,1\}//p' "$0"; }

force=0
while [ $# -gt 0 ]; do
    case $1 in
        -f|--force) force=1; shift ;;
        -h|--help) usage; exit 0 ;;
        --) shift; break ;;
        -*) echo "make-dev-cert: unknown option $1" >&2; usage >&2; exit 2 ;;
        *) break ;;
    esac
done

outdir=${1:-.}
[ $# -gt 0 ] && shift

command -v openssl >/dev/null 2>&1 || { echo "make-dev-cert: openssl is required" >&2; exit 1; }

san="DNS:localhost,IP:127.0.0.1,IP:::1"
for name in "$@"; do
    case $name in
        *[!A-Za-z0-9.:*-]*|'')
            echo "make-dev-cert: invalid name '$name' (DNS name or IP address expected)" >&2; exit 2 ;;
    esac
    case $name in
        *:*) san="$san,IP:$name" ;;                          # IPv6
        *[!0-9.]*) san="$san,DNS:$name" ;;                   # has a non-digit/dot: DNS name
        *) san="$san,IP:$name" ;;                            # IPv4
    esac
done

mkdir -p "$outdir"
cert="$outdir/cert.pem"
key="$outdir/key.pem"
if [ "$force" -eq 0 ] && { [ -e "$cert" ] || [ -e "$key" ]; }; then
    echo "make-dev-cert: $cert or $key already exists; use -f to overwrite" >&2
    exit 1
fi

# Write to temporary files first so a failure never leaves a half-written pair behind.
umask 077
tmpkey=$(mktemp "$outdir/.key.XXXXXX")
tmpcert=$(mktemp "$outdir/.cert.XXXXXX")
trap 'rm -f "$tmpkey" "$tmpcert"' EXIT INT TERM

openssl req -x509 -new -nodes \
    -newkey ec -pkeyopt ec_paramgen_curve:P-256 \
    -keyout "$tmpkey" -out "$tmpcert" \
    -days 30 -sha256 \
    -subj "/CN=localhost/O=keygate development (self-signed)" \
    -addext "subjectAltName=$san" \
    -addext "basicConstraints=critical,CA:FALSE" \
    -addext "keyUsage=critical,digitalSignature" \
    -addext "extendedKeyUsage=serverAuth" 2>/dev/null \
    || { echo "make-dev-cert: openssl failed (OpenSSL >= 1.1.1 is needed for -addext)" >&2; exit 1; }

chmod 600 "$tmpkey"
chmod 644 "$tmpcert"
mv -f "$tmpkey" "$key"
mv -f "$tmpcert" "$cert"
trap - EXIT INT TERM

echo "wrote $cert (self-signed, 30 days) and $key (mode 600)"
echo "  names:       $(echo "$san" | sed 's/,/, /g')"
echo "  expires:     $(openssl x509 -in "$cert" -noout -enddate | cut -d= -f2)"
echo "  fingerprint: $(openssl x509 -in "$cert" -noout -fingerprint -sha256 | cut -d= -f2)"
echo "  [tls] cert = \"$cert\", key = \"$key\"; clients: curl --cacert $cert https://localhost:8443/"
