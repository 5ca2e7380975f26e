#!/usr/bin/env bash
# The main job: the full local pipeline on the embedded default data (installs into .venv first).
# Arguments go to `stn-pipeline run`, e.g. `bash scripts/run.sh --home /tmp/stn --train-steps 200`.
# Relative paths in the arguments are the caller's: the script does not change directory.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
bash "$repo/scripts/setup.sh"
exec "$repo/.venv/bin/stn-pipeline" run "$@"
