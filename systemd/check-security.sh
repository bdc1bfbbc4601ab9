#!/bin/sh
# Rate the sandbox of keygate.service with `systemd-analyze security` and fail if it is worse
# than "OK" (overall exposure above 4.9 on systemd's 0.0-10.0 scale).
#
# Usage: systemd/check-security.sh [UNIT_FILE]      (default: keygate.service next to this script)
#   MAX_EXPOSURE=2.0 systemd/check-security.sh       stricter threshold
#
# Exit status: 0 = OK or better (or skipped: no systemd-analyze), 1 = exposure too high,
#              2 = the analysis could not be run or its output not understood.
set -eu

here=$(cd "$(dirname "$0")" && pwd)
unit=${1:-"$here/keygate.service"}
max=${MAX_EXPOSURE:-4.9}
name=$(basename "$unit")

if ! command -v systemd-analyze >/dev/null 2>&1; then
    echo "check-security: systemd-analyze not installed; skipping sandbox check (install the 'systemd' package to run it)."
    exit 0
fi
if [ ! -r "$unit" ]; then
    echo "check-security: cannot read unit file $unit" >&2
    exit 2
fi

# Offline mode (systemd >= 250) analyses the file itself, no running systemd or installed unit needed.
if systemd-analyze security --help 2>/dev/null | grep -q -- '--offline'; then
    if ! out=$(LC_ALL=C systemd-analyze security --no-pager --offline=true "$unit" 2>&1); then
        printf '%s\n' "$out" >&2
        echo "check-security: systemd-analyze failed" >&2
        exit 2
    fi
elif systemctl cat "$name" >/dev/null 2>&1; then
    # Older systemd: only a unit the running manager has loaded can be analysed.
    echo "check-security: this systemd-analyze has no --offline; analysing the INSTALLED $name instead of $unit"
    if ! out=$(LC_ALL=C systemd-analyze security --no-pager "$name" 2>&1); then
        printf '%s\n' "$out" >&2
        echo "check-security: systemd-analyze failed" >&2
        exit 2
    fi
else
    echo "check-security: systemd-analyze $(systemd-analyze --version | sed -n '1s/^systemd //p') has no --offline and $name is not installed; skipping."
    exit 0
fi

printf '%s\n' "$out"

# e.g. "→ Overall exposure level for keygate.service: 1.1 OK 🙂"
line=$(printf '%s\n' "$out" | grep 'Overall exposure level' | tail -n 1 || true)
score=$(printf '%s\n' "$line" | sed -n 's/.*Overall exposure level for [^:]*: *\([0-9][0-9]*\(\.[0-9]*\)\{0,1\}\) *\([A-Z]*\).*/\1/p')
rating=$(printf '%s\n' "$line" | sed -n 's/.*Overall exposure level for [^:]*: *[0-9.]* *\([A-Z]*\).*/\1/p')
if [ -z "$score" ]; then
    echo "check-security: could not find the 'Overall exposure level' line in the output" >&2
    exit 2
fi

if awk -v s="$score" -v m="$max" 'BEGIN { exit !(s + 0 > m + 0) }'; then
    echo "check-security: FAIL: exposure $score $rating is above the limit $max (OK or better is required)"
    exit 1
fi
echo "check-security: pass: exposure $score $rating (limit $max)"
