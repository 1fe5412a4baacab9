#!/usr/bin/env bash
# lm-evaluation-harness against a running engineroom server's OpenAI door (python -m rl.server).
#
#   export TINKER_BASE_URL=http://127.0.0.1:8000 TINKER_API_KEY=tml-...
#   bash scripts/evals.sh MODEL [lm_eval arguments ...]
#
# MODEL is a base model the server serves (SmolLM2-135M-Instruct) or a tinker:// sampler path
# of the key's own. Runs examples/evals/arithmetic (the main job's held-out set, graded as the
# RL loop grades it) through local-chat-completions, greedy, with the task's system prompt;
# results and per-problem samples go to runs/evals/. lm-eval lives in .venv-eval, set up once.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
model="${1:?usage: bash scripts/evals.sh MODEL [lm_eval arguments ...]}"
shift
: "${TINKER_BASE_URL:?export TINKER_BASE_URL (python -m rl.server prints it)}"
: "${TINKER_API_KEY:?export TINKER_API_KEY (python -m rl.server keys add NAME)}"
venv="${EVAL_VENV:-$root/.venv-eval}"
stamp="$venv/.eval-installed"
pins="lm_eval[api]==0.4.13"
if [[ ! -f "$stamp" || "$(cat "$stamp")" != "$pins" ]]; then
  echo "setting up $venv (once): $pins" >&2
  python3 -m venv "$venv"
  log="$(mktemp)"
  if ! "$venv/bin/pip" install -q $pins >"$log" 2>&1; then
    grep -v "is ignored: it is neither" "$log" >&2
    exit 1
  fi
  rm -f "$log"
  echo "$pins" >"$stamp"
fi
system="$(.venv/bin/python -c 'from envs.arithmetic import TASK; print(TASK.system_prompt)')"
OPENAI_API_KEY="$TINKER_API_KEY" exec "$venv/bin/lm_eval" \
  --model local-chat-completions \
  --model_args "model=$model,base_url=$TINKER_BASE_URL/oai/api/v1/chat/completions,num_concurrent=4,max_retries=2,tokenized_requests=False" \
  --tasks engineroom_arithmetic_level1 --include_path examples/evals/arithmetic \
  --apply_chat_template --system_instruction "$system" \
  --log_samples --output_path runs/evals "$@"
