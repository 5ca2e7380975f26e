#!/usr/bin/env bash
# Runs the linter, the formatter check and the tests (installs into .venv first if needed).
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m slow` or `-k sampler`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
rc=0
.venv/bin/python -m pytest "$@" || rc=$?
if [ "$rc" -eq 5 ]; then
  echo "test: pytest collected no tests" >&2
  rc=0
fi
exit "$rc"
