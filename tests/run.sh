#!/usr/bin/env bash
# The test command: prepares the Python virtualenv the SDK checks need
# (official openai, mistralai and anthropic packages), then runs every Rust test (all
# of them, past a failing one, so one failure never hides the rest).
set -euo pipefail
cd "$(dirname "$0")/.."

venv=.venv
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c 'import openai, mistralai, anthropic, selenium' 2>/dev/null; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check -r tests/requirements.txt
fi
export CARPOOL_PYTHON="$PWD/$venv/bin/python"

log=$(mktemp)
trap 'rm -f "$log"' EXIT
set +e
cargo test --locked --no-fail-fast "$@" 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
# One closing line over every test binary.
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "carpool: %d passed, %d failed\n", p, f }' "$log"
exit "$status"
