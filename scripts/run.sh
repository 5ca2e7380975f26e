#!/usr/bin/env bash
# The main job: the full local pipeline on the embedded default data (installs into .venv first).
# Arguments go to `stn-pipeline run`, e.g. `bash scripts/run.sh --home /tmp/stn --train-steps 200`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/stn-pipeline run "$@"
