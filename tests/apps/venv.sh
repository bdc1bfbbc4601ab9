#!/usr/bin/env bash
# Builds the virtualenv of the real-application tests from tests/apps/requirements.txt, exactly as
# tests/common/python.rs does (same place, same stamp, same lock), so CI fails here, early and
# clearly, when python3, its venv module or PyPI is missing. Reused while the stamp matches.
#   place: $KEYGATE_TEST_VENV, else ${CARGO_TARGET_DIR:-target}/py-venv
set -euo pipefail
cd "$(dirname "$0")/../.."
req=tests/apps/requirements.txt
venv=${KEYGATE_TEST_VENV:-${CARGO_TARGET_DIR:-target}/py-venv}
py=${KEYGATE_PYTHON:-python3}
stamp=$venv/keygate-requirements.txt

if [ -x "$venv/bin/python" ] && cmp -s "$req" "$stamp"; then
  echo "python venv up to date: $venv"; exit 0
fi
command -v "$py" >/dev/null || { echo "python3 not found: install python3 and python3-venv" >&2; exit 1; }
mkdir -p "$(dirname "$venv")"
lock=$venv.lock
for _ in $(seq 1 1200); do
  mkdir "$lock" 2>/dev/null && break
  # another process builds it; a lock older than 15 minutes is a crashed builder's
  if [ -n "$(find "$lock" -maxdepth 0 -mmin +15 2>/dev/null)" ]; then rmdir "$lock" 2>/dev/null || true; fi
  sleep 0.5
done
[ -d "$lock" ] || { echo "could not take $lock" >&2; exit 1; }
trap 'rmdir "$lock" 2>/dev/null || true' EXIT
if [ -x "$venv/bin/python" ] && cmp -s "$req" "$stamp"; then exit 0; fi
rm -rf "$venv"
"$py" -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$req"
cp "$req" "$stamp"
echo "python venv built: $venv"
