#!/usr/bin/env bash
# The test command: sets up .venv if needed, then lint, format check, type check and the tests
# (all of them, the slow SmolLM2 / vLLM ones included).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup_venv.sh
export WANDB_MODE=offline TOKENIZERS_PARALLELISM=false
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
.venv/bin/pytest "$@"
