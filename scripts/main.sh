#!/usr/bin/env bash
# The main job on the embedded defaults (a local Ray, the packaged SmolLM2-135M-Instruct).
# Extra key=value arguments go to the job's config.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup_venv.sh
export WANDB_MODE="${WANDB_MODE:-offline}" TOKENIZERS_PARALLELISM=false
exec .venv/bin/python -m rl.loop.train "$@"
