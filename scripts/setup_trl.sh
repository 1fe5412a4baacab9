#!/usr/bin/env bash
# Creates .venv-trl at the repo root, once: Hugging Face TRL for bench/bench_vs_trl.py only.
# TRL is never a dependency of engineroom; nothing of ours is installed here (the bench puts
# the repo root on PYTHONPATH so that `envs`, which imports no torch/ray/vllm of its own,
# gives TRL the same prompts and rewards). Re-running is cheap: a stamp keyed on the pins.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
venv="${TRL_VENV:-$root/.venv-trl}"
stamp="$venv/.trl-installed"
# torch first in the list and pinned: the CPU build on local disk, not a multi-GB CUDA build.
# transformers and peft as in .venv, so both sides tokenize and apply LoRA alike.
pins='torch==2.13.0 trl==1.16.0 transformers==5.19.0 peft==0.21.2'
if [[ -f "$stamp" && "$(cat "$stamp")" == "$pins" ]]; then
  exit 0
fi
echo "setting up $venv (once): $pins" >&2
python3 -m venv "$venv"
log="$(mktemp)"
if ! "$venv/bin/pip" install -q $pins >"$log" 2>&1; then
  grep -v "is ignored: it is neither" "$log" >&2
  rm -f "$log"
  exit 1
fi
rm -f "$log"
"$venv/bin/python" -c "import torch, trl; assert torch.__version__.startswith('2.13.0'), torch.__version__"
echo "$pins" >"$stamp"
