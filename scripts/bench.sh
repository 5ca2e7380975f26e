#!/usr/bin/env bash
# Runs every benchmark in benchmarks/ and prints its table (installs into .venv first).
# `bash scripts/bench.sh sampler` runs only benchmarks/bench_sampler.py.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PIP_IGNORE_REQUIRES_PYTHON=1
# PyTorch is the sampler's yardstick; optional (the CPU wheel of 2.13.0 lies on these machines).
.venv/bin/python -c "import torch" 2>/dev/null \
  || .venv/bin/python -m pip install --quiet -c constraints.txt "torch==2.13.0" \
  || echo "bench: torch could not be installed; the PyTorch comparison is skipped" >&2
for bench in benchmarks/bench_${1:-*}.py; do
  echo "== $bench"
  .venv/bin/python "$bench"
done
