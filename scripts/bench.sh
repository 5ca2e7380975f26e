#!/usr/bin/env bash
# Runs the benchmarks and prints their tables (installs into .venv first).
#   bash scripts/bench.sh                      every benchmark; the accuracy one in --small mode
#   bash scripts/bench.sh NAME [ARGS...]       one, e.g. `sampler --threads 1` or `accuracy`
#                                              (the full accuracy table: `accuracy --jobs 2`, 64
#                                              min on 2 cores, measured; with the default --jobs 1
#                                              about 80, an older estimate, never measured)
# Relative paths in the arguments (--out, --home) are the caller's: no change of directory.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
bash "$repo/scripts/setup.sh"
export PIP_IGNORE_REQUIRES_PYTHON=1
python="$repo/.venv/bin/python"
# PyTorch is the sampler's yardstick; optional (the CPU wheel of 2.13.0 lies on these machines).
"$python" -c "import torch" 2>/dev/null \
  || "$python" -m pip install --quiet -c "$repo/constraints.txt" "torch==2.13.0" \
  || echo "bench: torch could not be installed; the PyTorch comparison is skipped" >&2
if [ $# -gt 0 ]; then
  name=$1
  shift
  exec "$python" "$repo/benchmarks/bench_${name}.py" "$@"
fi
for name in sampler train_step ingest serving multiworker pipeline; do
  echo "== benchmarks/bench_${name}.py"
  "$python" "$repo/benchmarks/bench_${name}.py"
done
echo "== benchmarks/bench_accuracy.py --small"
"$python" "$repo/benchmarks/bench_accuracy.py" --small
