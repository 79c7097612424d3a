#!/usr/bin/env bash
# The test command: prepares the Python virtualenv the SDK checks need
# (official openai and mistralai packages), then runs every Rust test.
set -euo pipefail
cd "$(dirname "$0")/.."

venv=.venv
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c 'import openai, mistralai' 2>/dev/null; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check -r tests/requirements.txt
fi
export CARPOOL_PYTHON="$PWD/$venv/bin/python"

cargo test --locked "$@"
