#!/usr/bin/env bash
# Creates or refreshes the project's virtual environment at .venv from constraints.txt.
# Idempotent: skips the install when pyproject.toml and constraints.txt are unchanged; then builds
# the native sampler if it is out of date.
set -euo pipefail
cd "$(dirname "$0")/.."

# tfx 1.16.0 declares Requires-Python <3.11 although its whole stack ships cp311 wheels.
export PIP_IGNORE_REQUIRES_PYTHON=1
export PIP_DISABLE_PIP_VERSION_CHECK=1

PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
"$PYTHON" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' \
  || { echo "setup: Python 3.11 is required (found $("$PYTHON" --version 2>&1))" >&2; exit 1; }

# The stamp covers the checkout's path too: the venv's scripts and editable install hold it.
stamp=.venv/.installed
want=$( (pwd -P; cat pyproject.toml constraints.txt) | sha256sum | cut -d' ' -f1)
# A usable .venv runs Python 3.11 and has pip; made again otherwise: one whose creation was cut
# short (Ctrl-C in its first seconds) has no pip, one made by another Python cannot install the
# stack (pip ignores Requires-Python here), one whose interpreter was removed cannot run.
venv_usable() {
  .venv/bin/python -c 'import sys, pip; sys.exit(sys.version_info[:2] != (3, 11))' 2>/dev/null
}
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ] || ! venv_usable; then
  # The environment takes 3.7 GB (TensorFlow, TFX, Beam); pip needs room for the wheels too.
  free_mb=$(df -Pm . | awk 'NR == 2 {print $4}')
  if [ "$free_mb" -lt 5000 ]; then
    echo "setup: .venv needs about 5,000 MB of free disk, $(pwd) has $free_mb MB" >&2
    exit 1
  fi
  venv_usable || "$PYTHON" -m venv --clear .venv
  echo "setup: installing into .venv from constraints.txt (a few minutes the first time)" >&2
  .venv/bin/python -m pip install --quiet --upgrade "pip<26" setuptools wheel -c constraints.txt 2>/dev/null \
    || .venv/bin/python -m pip install --quiet --upgrade "pip<26"
  .venv/bin/python -m pip install --quiet -c constraints.txt -e ".[dev]" \
    2> >(grep -v "is ignored: it is neither" >&2)
  echo "$want" > "$stamp"
  echo "setup: done" >&2
fi

# The native CPU sampler (stn_model/native): run as a file, the build returns at once when the
# library is up to date. Without it bilinear_sample uses its slower pure-TF path.
if ! command -v g++ >/dev/null; then
  echo "setup: warning: g++ not found, the native sampler is not built (the pure-TF one is used)" >&2
elif ! .venv/bin/python stn_model/native/build.py; then
  echo "setup: warning: the native sampler did not build (the pure-TF one is used)" >&2
fi
