#!/usr/bin/env bash
# tinker-cookbook, unmodified, against a running engineroom server (python -m rl.server).
#
#   export TINKER_BASE_URL=http://127.0.0.1:8000 TINKER_API_KEY=tml-...
#   bash scripts/cookbook.sh math_rl [key=value ...]   # RL on arithmetic (recipes/math_rl)
#   bash scripts/cookbook.sh sl [key=value ...]        # supervised on a local conversations file
#   bash scripts/cookbook.sh install                    # only set up .venv-cookbook
#
# The cookbook runs in an environment of its own, .venv-cookbook (tinker 0.38.0 and
# tinker-cookbook 0.6.1, which moves transformers to a version the server does not use);
# nothing of the server's is installed there. tinker-cookbook goes in with --no-deps after its
# requirements, all but tml-renderers>=0.4.1, which the package index lacks and which the
# cookbook imports only for Thinking Machines' own model families and the audio recipes.
# Later key=value arguments override the defaults below. COOKBOOK_MODEL is the model_name the
# recipe passes to the server and loads its tokenizer from: by default the local directory of
# the built-in SmolLM2-135M-Instruct (start the server with --models SmolLM2-135M-Instruct,
# which serves that directory too).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
recipe="${1:-}"
shift || true
case "$recipe" in
  math_rl|sl|install) ;;
  *) echo "usage: bash scripts/cookbook.sh math_rl|sl|install [key=value ...]" >&2; exit 2 ;;
esac
if [[ "$recipe" != install ]]; then
  : "${TINKER_BASE_URL:?export TINKER_BASE_URL (python -m rl.server prints it)}"
  : "${TINKER_API_KEY:?export TINKER_API_KEY (python -m rl.server keys add NAME)}"
fi

venv="${COOKBOOK_VENV:-$root/.venv-cookbook}"
stamp="$venv/.cookbook-installed"
cookbook='tinker-cookbook==0.6.1'
# Its Requires-Dist minus tml-renderers, plus the math-rl extra (math-verify, pylatexenc,
# sympy); torch pinned: the CPU build on local disk, not a multi-GB CUDA build.
requirements=(
  torch==2.13.0 tinker==0.38.0 "aiohttp>=3.9.0" "anyio>=4.0.0" "blobfile>=3.0.0" "chz>=0.4.0"
  "cloudpickle>=3.0.0" "datasets>=2.14.0" "huggingface-hub>=0.20.0" "numpy>=1.24.0"
  "pillow>=10.0.0" "pydantic>=2.0.0" "pyrage>=1.4.0" "rich>=13.0.0" "safetensors>=0.4.0"
  "termcolor>=2.0.0" "tiktoken>=0.12.0" "tqdm>=4.60.0"
  "transformers!=5.3.0,!=5.4.*,!=5.5.0,!=5.5.1,!=5.5.2,!=5.5.3,!=5.6.*,>=4.57.6"
  "math-verify>=0.5.0" "pylatexenc>=2.0" "sympy>=1.12.0"
)
key="$(echo "$cookbook ${requirements[*]}" | sha256sum | cut -d' ' -f1)"
if [[ ! -f "$stamp" || "$(cat "$stamp")" != "$key" ]]; then
  echo "setting up $venv (once): $cookbook" >&2
  python3 -m venv "$venv"
  log="$(mktemp)"
  if ! { "$venv/bin/pip" install -q "${requirements[@]}" &&
    "$venv/bin/pip" install -q --no-deps "$cookbook"; } >"$log" 2>&1; then
    grep -v "is ignored: it is neither" "$log" >&2
    exit 1
  fi
  rm -f "$log"
  echo "$key" >"$stamp"
fi
[[ "$recipe" == install ]] && exit 0

model="${COOKBOOK_MODEL:-}"
if [[ -z "$model" ]]; then
  bash scripts/setup_venv.sh
  model="$(.venv/bin/python -c 'from rl.models import resolve_model; print(resolve_model("SmolLM2-135M-Instruct"))')"
fi
export TINKER_TELEMETRY="${TINKER_TELEMETRY:-0}"
# SmolLM2 speaks ChatML, which the qwen3_instruct renderer writes (no thinking tags).
if [[ "$recipe" == math_rl ]]; then
  exec "$venv/bin/python" -m tinker_cookbook.recipes.math_rl.train \
    model_name="$model" renderer_name=qwen3_instruct env=arithmetic \
    lora_rank=16 group_size=8 groups_per_batch=12 learning_rate=1e-3 max_tokens=8 \
    max_steps=20 eval_every=0 save_every=10 \
    log_path=runs/cookbook/math_rl behavior_if_log_dir_exists=delete "$@"
fi
exec "$venv/bin/python" -m tinker_cookbook.recipes.chat_sl.train \
  model_name="$model" renderer_name=qwen3_instruct dataset="$root/examples/data/chat_sft.jsonl" \
  batch_size=8 max_length=512 learning_rate=2e-4 lr_schedule=constant lora_rank=16 \
  save_every=5 eval_every=5 \
  log_path=runs/cookbook/sl behavior_if_log_dir_exists=delete "$@"
