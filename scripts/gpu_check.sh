#!/usr/bin/env bash
# The GPU check (bench/gpu_check.py) on a machine with torch, transformers and peft but no
# Ray, no vLLM, no pydantic and no network, such as the device machine (H100 / H200):
#
#   bash scripts/gpu_check.sh                    # all four checks, real shapes (<= 8 min)
#   bash scripts/gpu_check.sh parts=numerics     # any key=value of bench/gpu_check.py
#
# The engine's records need pydantic, which that machine lacks: its wheels (and those of its
# dependencies) are carried in .whl/ (ignored by git through .git/info/exclude) and installed
# into /tmp/site. Fetch them once, on a machine with a package index:
#
#   bash scripts/gpu_check.sh --download-wheels
#
# Results go to stdout and, where $OUT is set (the device tool), to $OUT/gpu_check.json and
# $OUT/gpu_check.log.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON="${PYTHON:-python3}"
WHEELS=(pydantic==2.14.4 pydantic_core==2.50.5 annotated_types==0.8.0
        typing_extensions==4.16.0 typing_inspection==0.4.5)

if [[ "${1:-}" == "--download-wheels" ]]; then
    mkdir -p .whl
    for wheel in "${WHEELS[@]}"; do
        "$PYTHON" -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
            --implementation cp --platform manylinux_2_28_x86_64 \
            --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl "$wheel"
    done
    exit 0
fi

if ! "$PYTHON" -c "import pydantic" 2>/dev/null; then
    if ! ls .whl/*.whl >/dev/null 2>&1; then
        echo "pydantic is missing and no wheels are in .whl/: run $0 --download-wheels" >&2
        exit 1
    fi
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi

export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
args=("$@")
if [[ -n "${OUT:-}" ]]; then
    args+=("json=$OUT/gpu_check.json")
    "$PYTHON" bench/gpu_check.py "${args[@]}" 2>&1 | tee "$OUT/gpu_check.log"
else
    "$PYTHON" bench/gpu_check.py "${args[@]}"
fi
