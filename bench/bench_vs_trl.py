"""Head to head with Hugging Face TRL on the main job: wall time to 80% held-out accuracy.

    .venv/bin/python bench/bench_vs_trl.py                  # 20 steps, ours first, then TRL
    .venv/bin/python bench/bench_vs_trl.py --steps 8 --sides trl,ours --trl-lr 1e-4
    .venv/bin/python bench/bench_vs_trl.py --quick          # 2 steps per side: a smoke run
    .venv/bin/python bench/bench_vs_trl.py --ours sampler.sync_mode=adapter     # extra rl.loop.train keys
    .venv/bin/python bench/bench_vs_trl.py --steps 5 --repeats 3 --trl-seed 0,1,2  # spreads
    .venv/bin/python bench/bench_vs_trl.py --level 2 --repeats 4 --trl-seed 0,1,2,3  # harder

One invocation runs both sides one after the other, each in a child process of its own:

- ours: `python -m rl.loop.train` with the task keys below and our preset's defaults for everything
  else (learning rate, loss, LoRA, engines), held-out eval after every step (`eval_every=1`;
  the baseline eval before step 0 is the loop's own);
- TRL: `GRPOTrainer` 1.16 (HF generate, no vLLM) in its own environment `.venv-trl`
  (scripts/setup_trl.sh; never a dependency of engineroom), from this same file run with
  `--trl-child`: `loss_type="dapo"`, `scale_rewards="none"`, `beta=0`, float32, gradient
  checkpointing off, constant lr (`--trl-lr`, 1e-3 by default), AdamW beta2 0.95, grad norm
  clipped to 1.0, LoRA r16 alpha 32 on q/k/v/o/gate/up/down, temperature 1, 16 tokens,
  96 completions per step (12 prompts x 8, one generation per optimizer step).

The task is the same on both sides by construction: arithmetic level 1 (`--level N` for
another of envs/arithmetic.py's levels) from `envs` (seed 0),
12 problems x 8 samples per step, the training problems in our loop's batch order (TRL reads
them in dataset order, shuffling off), the same 100 held-out problems, the prompts rendered by
`envs.chat.ChatRenderer` with the task's system prompt (TRL gets the template's text, and the
child checks that TRL's tokenizer turns it into exactly our prompt tokens), and the reward
of `envs.problem.ProblemTask.reward` on the sampled tokens (the format counts only for a
reply that ended with the end-of-turn token, as in our loop). TRL's held-out eval is a
callback after every optimizer step (and before the first): greedy, batched with left
padding, 16 tokens, accuracy = share of correct replies, format = share well-formed.

Timing: every time is wall seconds since the child process was spawned (imports, model load
and start-up included); times to 80% (and their ratio) leave out the time each side spent in
its own held-out evals, which run on vLLM for ours and HF generate for TRL's and would
otherwise favour us. The summary also shows each run's lowest eval from step 5 on, and with
several runs how many never fell below 88% there. TRL's child stamps its own events; for ours the parent stamps each
line of the child's stdout as it arrives and takes the eval times from the loop's
"[baseline|eval|final] after N steps: held-out ..." lines (exact accuracies come from
metrics.jsonl afterwards). Peak memory is the peak over one-second samples of the RSS summed
over the child and all its descendants (Ray's GCS, raylet and actor processes for ours); a
sum of RSS counts shared pages (libraries, Ray's object store) once per process, so it
overstates ours somewhat.

One run per side is one draw: step 1 is a single Adam step from a zero LoRA B, and whether it
lifts the held-out accuracy past 80% varies from run to run on both sides. `--repeats N` runs
ours N times (the task's seed stays 0; the runs differ in their sampling) and `--trl-seed`
takes a list of TRL seeds, one run each (a TRL run is deterministic for its seed); the summary
then adds each side's median time to 80%, the share of runs that reached it at step 1 and the
mean accuracy at each mark.

Seconds per step by phase: ours from metrics.jsonl (`time/sample_s`, `time/score_s`,
`time/train_s`, `time/sync_s`, `time/eval_s`, `time/step_s`); TRL's from timers around its
own methods: generate (`_generate_single_turn`, HF generate), score (the rest of
`_generate_and_score_completions`: decoding, rewards, advantages), train (the rest of the
optimizer step: forward, backward, AdamW) and eval (the callback). Means leave out the first
step (warm-up) when there are more than two.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Imports only envs (no torch, ray or vllm): the TRL child runs this file in .venv-trl.
from envs.arithmetic import LEVELS, build_datasets  # noqa: E402
from envs.chat import ChatRenderer  # noqa: E402
from envs.problem import ProblemGroupBuilder  # noqa: E402

# The task, passed to rl.loop.train as key=value and rebuilt here for TRL from the same envs call.
TASK_KEYS = {
    "env": "arithmetic",
    "env_args": "level=1,num_test=100",
    "base_model": "SmolLM2-135M-Instruct",
    "seed": "0",
    "groups_per_batch": "12",
    "group_size": "8",
    "max_tokens": "16",
    "temperature": "1.0",
}
LEVEL, NUM_TEST, SEED, GROUPS, GROUP_SIZE, MAX_TOKENS = 1, 100, 0, 12, 8, 16


def task_keys(level: int = LEVEL) -> dict[str, str]:
    """TASK_KEYS with arithmetic at `level` (envs/arithmetic.py LEVELS)."""
    return {**TASK_KEYS, "env_args": f"level={level},num_test={NUM_TEST}"}


MARKS = (0, 5, 10, 20)  # steps whose accuracy the summary shows
HOLD_FROM, HOLD = 5, 0.88  # each run's lowest eval from this step on, against this floor
TARGET = 0.8
TRL_VENV = ROOT / ".venv-trl"


# -- the task, shared by both sides ----------------------------------------------------------


@dataclass(frozen=True)
class Prompt:
    """One problem as TRL gets it: the chat template's text, our tokens of it, the answer."""

    text: str
    tokens: list[int]
    answer: str


def task_prompts(
    tokenizer: Any, steps: int, level: int = LEVEL
) -> tuple[list[Prompt], list[Prompt]]:
    """(train, test): `steps` x 12 training prompts in rl.loop.train's batch order (step s uses
    `train.get_batch(s % len(train))`, as `rl.loop.train.batch_builders`), and the 100 held-out."""
    renderer = ChatRenderer(tokenizer)
    train, test = build_datasets(
        renderer,
        batch_size=GROUPS,
        group_size=GROUP_SIZE,
        seed=SEED,
        level=level,
        num_test=NUM_TEST,
    )
    train_builders = [b for s in range(steps) for b in train.get_batch(s % len(train))]
    test_builders = [b for i in range(len(test)) for b in test.get_batch(i)]

    def prompt(builder: Any) -> Prompt:
        assert isinstance(builder, ProblemGroupBuilder), type(builder)
        messages = builder.task.messages(builder.problem.question)
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return Prompt(text, renderer.build_prompt(messages), builder.problem.answer)

    return [prompt(b) for b in train_builders], [prompt(b) for b in test_builders]


def score(renderer: ChatRenderer, reply_tokens: Sequence[int], answer: str) -> dict[str, float]:
    """Reward, correctness and format of one reply, exactly as `envs.problem.ProblemEnv.step`."""
    from envs.arithmetic import TASK

    message, ended = renderer.parse_response(list(reply_tokens))
    reward, metrics = TASK.reward(message["content"], answer, ended)
    return {"reward": reward, **metrics}


# -- TRL's side (runs in .venv-trl) ---------------------------------------------------------


def run_trl_child(
    model_path: str,
    steps: int,
    lr: float,
    events_path: str,
    out_dir: str,
    seed: int = SEED,
    level: int = LEVEL,
) -> None:
    """GRPOTrainer on the task; writes one JSON line per eval and per step to `events_path`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    events = EventLog(events_path)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    renderer = ChatRenderer(tokenizer)
    train, test = task_prompts(tokenizer, steps, level)
    check_trl_tokens(tokenizer, [*train, *test])
    from datasets import Dataset

    dataset = Dataset.from_list([{"prompt": p.text, "answer": p.answer} for p in train])

    def reward(completion_ids: list[list[int]], answer: list[str], **_: Any) -> list[float]:
        return [
            score(renderer, ids, a)["reward"] for ids, a in zip(completion_ids, answer, strict=True)
        ]

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    greedy = GenerationConfig(
        do_sample=False,
        max_new_tokens=MAX_TOKENS,
        eos_token_id=renderer.stop_condition,
        pad_token_id=tokenizer.pad_token_id,
    )
    held_out = GreedyEval(tokenizer, renderer, test, greedy, events.emit)
    phases = {"generate_s": 0.0, "rollout_s": 0.0}  # seconds in this step, per method
    trainer = timed_grpo_trainer(phases)(
        model=model,
        reward_funcs=reward,
        args=grpo_config(out_dir, steps, lr, seed),
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=lora_config(),
        callbacks=[eval_callback(held_out, phases, events.emit)],
    )
    trainer.train()
    events.emit("done")
    events.close()


class EventLog:
    """The TRL child's events file: one JSON line per event, stamped with time.time()."""

    def __init__(self, path: str) -> None:
        self._file = open(path, "a")  # noqa: SIM115 (open for the whole run)

    def emit(self, kind: str, **values: Any) -> None:
        self._file.write(json.dumps({"kind": kind, "time": time.time(), **values}) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def check_trl_tokens(tokenizer: Any, prompts: Sequence[Prompt]) -> None:
    """TRL tokenizes the text itself: it must give our tokens."""
    for p in prompts:
        got = tokenizer(text=p.text)["input_ids"]
        if got != p.tokens:
            raise SystemExit(f"TRL's tokens of {p.text!r} differ from ours: {got} != {p.tokens}")


@dataclass
class GreedyEval:
    """TRL's held-out eval: greedy, batched with left padding; emits one "eval" event."""

    tokenizer: Any
    renderer: ChatRenderer
    test: list[Prompt]
    greedy: Any  # transformers.GenerationConfig
    emit: Callable[..., None]

    def __call__(self, policy: Any, step: int) -> None:
        import torch

        began = time.perf_counter()
        was_training = policy.training
        policy.eval()
        test = self.test
        width = max(len(p.tokens) for p in test)
        pad = self.tokenizer.pad_token_id
        ids = torch.tensor([[pad] * (width - len(p.tokens)) + p.tokens for p in test])
        mask = torch.tensor([[0] * (width - len(p.tokens)) + [1] * len(p.tokens) for p in test])
        with torch.no_grad():
            out = policy.generate(input_ids=ids, attention_mask=mask, generation_config=self.greedy)
        policy.train(was_training)
        scores = [
            score(self.renderer, row[width:].tolist(), p.answer)
            for row, p in zip(out, test, strict=True)
        ]
        self.emit(
            "eval",
            step=step,
            accuracy=statistics.fmean(s["correct"] for s in scores),
            format=statistics.fmean(s["format"] for s in scores),
            eval_s=time.perf_counter() - began,
        )


def timed_grpo_trainer(phases: dict[str, float]) -> type:
    """GRPOTrainer adding the seconds of its generate and rollout methods to `phases`."""
    from trl import GRPOTrainer

    class TimedGRPOTrainer(GRPOTrainer):
        def _generate_single_turn(self, *args: Any, **kwargs: Any) -> Any:
            began = time.perf_counter()
            out = super()._generate_single_turn(*args, **kwargs)
            phases["generate_s"] += time.perf_counter() - began
            return out

        def _generate_and_score_completions(self, *args: Any, **kwargs: Any) -> Any:
            began = time.perf_counter()
            out = super()._generate_and_score_completions(*args, **kwargs)
            phases["rollout_s"] += time.perf_counter() - began
            return out

    return TimedGRPOTrainer


def eval_callback(
    held_out: Callable[[Any, int], None], phases: dict[str, float], emit: Callable[..., None]
) -> Any:
    """A TrainerCallback: the held-out eval before the first step and after every step, and
    one "step" event per step with its phases."""
    from transformers import TrainerCallback

    class HeldOutEval(TrainerCallback):
        def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            held_out(kw["model"], 0)

        def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            phases.update(generate_s=0.0, rollout_s=0.0)
            self.began = time.perf_counter()

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            step_s = time.perf_counter() - self.began
            emit(
                "step",
                step=state.global_step,
                generate_s=phases["generate_s"],
                score_s=phases["rollout_s"] - phases["generate_s"],
                train_s=step_s - phases["rollout_s"],
            )
            held_out(kw["model"], state.global_step)

    return HeldOutEval()


def grpo_config(out_dir: str, steps: int, lr: float, seed: int) -> Any:
    """TRL's settings, matched to our loop's (see the module docstring)."""
    from trl import GRPOConfig

    return GRPOConfig(
        output_dir=out_dir,
        max_steps=steps,
        per_device_train_batch_size=GROUPS * GROUP_SIZE,
        gradient_accumulation_steps=1,
        steps_per_generation=1,
        num_generations=GROUP_SIZE,
        shuffle_dataset=False,
        max_completion_length=MAX_TOKENS,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        use_vllm=False,
        loss_type="dapo",
        scale_rewards="none",
        beta=0.0,
        learning_rate=lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        optim="adamw_torch",
        adam_beta2=0.95,
        weight_decay=0.0,
        max_grad_norm=1.0,
        bf16=False,
        fp16=False,
        gradient_checkpointing=False,
        seed=seed,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
    )


def lora_config() -> Any:
    from peft import LoraConfig

    return LoraConfig(
        r=16,
        lora_alpha=32,
        lora_dropout=0.0,
        target_modules=[
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
        ],
        task_type="CAUSAL_LM",
    )


# -- the parent: run, watch, summarise ------------------------------------------------------


@dataclass
class Eval:
    step: int
    accuracy: float
    format: float
    seconds: float  # since the child was spawned
    eval_s: float = 0.0  # how long this eval itself took


@dataclass
class Side:
    name: str  # "ours" or "trl"
    label: str = ""  # the run's column: the name, with its repeat or seed when there are several
    evals: list[Eval] = field(default_factory=list)
    phases: dict[str, float] = field(default_factory=dict)  # mean seconds per step
    peak_rss_mib: float = 0.0
    wall_s: float = 0.0
    config: dict[str, Any] = field(default_factory=dict)
    log: str = ""

    def net_seconds(self, e: Eval) -> float:
        """`e.seconds` less the time spent in this side's held-out evals up to and including
        `e` (ours run on vLLM, TRL's on HF generate: counted in, they would favour us)."""
        return e.seconds - sum(x.eval_s for x in self.evals if x.step <= e.step)

    def lowest_from(self, step: int) -> float:
        """The lowest held-out accuracy of the evals after `step` steps or more."""
        return min((e.accuracy for e in self.evals if e.step >= step), default=math.nan)

    def time_to(self, target: float) -> Eval | None:
        return next(
            (e for e in sorted(self.evals, key=lambda e: e.step) if e.accuracy >= target), None
        )

    def at(self, step: int) -> Eval | None:
        return next((e for e in self.evals if e.step == step), None)


def tree_rss(pid: int) -> int:
    """RSS in bytes of process `pid` and all its descendants (0 once it is gone)."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0
    total = 0
    for proc in procs:
        with contextlib.suppress(psutil.Error):  # it may have exited meanwhile
            total += proc.memory_info().rss
    return total


def run_child(
    cmd: list[str], env: dict[str, str], log_path: Path, on_line: Callable[[str, float], None]
) -> tuple[float, float]:
    """Runs `cmd`, stamping each output line (to `on_line` and `log_path`) with the seconds
    since the spawn; returns (spawn time, peak tree RSS in MiB). Raises on a non-zero exit."""
    spawned = time.time()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        peak = [0]
        done = threading.Event()

        def watch() -> None:
            while not done.wait(1.0):
                peak[0] = max(peak[0], tree_rss(proc.pid))

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        assert proc.stdout is not None
        try:
            for line in proc.stdout:
                seconds = time.time() - spawned
                log.write(f"{seconds:8.1f} {line}")
                log.flush()
                on_line(line, seconds)
            rc = proc.wait()
        finally:  # interrupted (Ctrl-C, a timeout): the child goes too, Ray and all
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    proc.kill()
            done.set()
            watcher.join()
    if rc != 0:
        tail = log_path.read_text().splitlines()[-30:]
        raise SystemExit(
            f"{cmd[:3]} failed (exit {rc}); last lines of {log_path}:\n" + "\n".join(tail)
        )
    return spawned, peak[0] / 2**20


EVAL_LINE = re.compile(r"\[(?:baseline|eval|final)\] after (\d+) steps: held-out accuracy")


def run_ours(
    steps: int, work: Path, extra: Sequence[str], tag: str = "ours", level: int = LEVEL
) -> Side:
    run_dir = work / tag
    cmd = [sys.executable, "-m", "rl.loop.train", f"num_steps={steps}", "eval_every=1"]
    cmd += [f"{k}={v}" for k, v in task_keys(level).items()]
    cmd += [f"log_dir={run_dir}", "on_existing=overwrite", *extra]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a fresh embedded Ray
    env["PYTHONUNBUFFERED"] = "1"
    times: dict[int, float] = {}

    def on_line(line: str, seconds: float) -> None:
        match = EVAL_LINE.search(line)
        if match:
            times.setdefault(int(match.group(1)), seconds)

    print(f"{tag}: {' '.join(cmd[1:])}", flush=True)
    log = work / f"{tag}.log"
    spawned, peak = run_child(cmd, env, log, on_line)
    side = parse_ours(run_dir, times, str(log))
    side.label = tag
    side.wall_s, side.peak_rss_mib = time.time() - spawned, peak
    return side


def parse_ours(run_dir: Path, times: dict[int, float], log: str) -> Side:
    """Our side from its metrics.jsonl and the stdout times of its eval lines (step -> s)."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    found: dict[int, tuple[float, float, float]] = {}
    for r in records:
        if "baseline/accuracy" in r:
            found[0] = (
                r["baseline/accuracy"],
                r.get("baseline/format", math.nan),
                r.get("baseline/eval_s", 0.0),
            )
        if "eval/accuracy" in r:
            found[int(r["eval/step"])] = (
                r["eval/accuracy"],
                r.get("eval/format", math.nan),
                r.get("time/eval_s", 0.0),
            )
    missing = sorted(set(found) - set(times))
    if missing:
        raise SystemExit(f"ours: no eval line on stdout for steps {missing}; see {log}")
    side = Side("ours", log=log, config=json.loads((run_dir / "config.json").read_text()))
    side.evals = [Eval(s, a, f, times[s], d) for s, (a, f, d) in sorted(found.items())]
    keys = ("sample_s", "score_s", "train_s", "sync_s", "eval_s")
    side.phases = mean_phases(
        [{k: r.get(f"time/{k}", 0.0) for k in keys} for r in records], side.evals
    )
    return side


def run_trl(
    steps: int,
    lr: float,
    work: Path,
    model_path: str,
    seed: int = SEED,
    tag: str = "trl",
    level: int = LEVEL,
) -> Side:
    subprocess.run(["bash", str(ROOT / "scripts" / "setup_trl.sh")], check=True)
    events_path = work / f"{tag}_events.jsonl"
    events_path.unlink(missing_ok=True)
    python = str(TRL_VENV / "bin" / "python")
    cmd = [python, str(Path(__file__).resolve()), "--trl-child", "--model", model_path]
    cmd += ["--steps", str(steps), "--trl-lr", str(lr), "--events", str(events_path)]
    cmd += ["--trl-out", str(work / tag), "--trl-seed", str(seed), "--level", str(level)]
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
    env.update(HF_HUB_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1")  # a local model: no network
    print(f"trl: GRPOTrainer, lr {lr}, seed {seed}", flush=True)
    spawned, peak = run_child(cmd, env, work / f"{tag}.log", lambda *_: None)
    side = parse_trl(events_path, spawned, str(work / f"{tag}.log"))
    side.label = tag
    side.wall_s, side.peak_rss_mib = time.time() - spawned, peak
    side.config = {
        "learning_rate": lr,
        "seed": seed,
        "loss_type": "dapo",
        "scale_rewards": "none",
        "beta": 0.0,
    }
    return side


def parse_trl(events_path: Path, spawned: float, log: str) -> Side:
    """TRL's side from the child's events (`spawned`: the child's spawn time, time.time())."""
    events = [json.loads(line) for line in events_path.read_text().splitlines()]
    side = Side("trl", log=log)
    side.evals = [
        Eval(e["step"], e["accuracy"], e["format"], e["time"] - spawned, e["eval_s"])
        for e in events
        if e["kind"] == "eval"
    ]
    evals_s = {e["step"]: e["eval_s"] for e in events if e["kind"] == "eval"}
    rows = [
        {
            **{k: e[k] for k in ("generate_s", "score_s", "train_s")},
            "eval_s": evals_s.get(e["step"], 0.0),
        }
        for e in events
        if e["kind"] == "step"
    ]
    side.phases = mean_phases(rows, side.evals)
    return side


def mean_phases(rows: list[dict[str, float]], evals: list[Eval]) -> dict[str, float]:
    """Mean seconds per step of each phase, and `step_s`: from one eval's end to the next's
    (everything a step costs, its eval included). The first step (warm-up) is left out when
    there are more than two."""
    ends = [e.seconds for e in sorted(evals, key=lambda e: e.step)]
    rows = [{**r, "step_s": b - a} for r, a, b in zip(rows, ends, ends[1:], strict=False)]
    rows = rows[1:] if len(rows) > 2 else rows
    return {k: statistics.fmean(r[k] for r in rows) for k in rows[0]} if rows else {}


def resolve_model_path() -> str:
    from rl.models import resolve_model

    return str(resolve_model(TASK_KEYS["base_model"]))


PHASES = {  # key -> label, in the order shown
    "sample_s": "sample (ours)",
    "generate_s": "generate (TRL)",
    "score_s": "score",
    "train_s": "train",
    "sync_s": "sync (ours)",
    "eval_s": "held-out eval",
    "step_s": "whole step, eval to eval",
}


def summary(sides: list[Side], steps: int) -> str:
    """The comparison as text, one column per run: time to 80%, accuracy marks, phases,
    memory, every eval; with several runs of a side, each side's spread after it."""

    def cell(e: Eval | None) -> str:
        return f"{e.accuracy:.0%} / {e.format:.0%} ({e.seconds:.0f} s)" if e else "-"

    names = [s.label or s.name for s in sides]
    hit = [s.time_to(TARGET) for s in sides]
    marks = [m for m in MARKS if m < steps] + [steps]
    rows = [["", *names]]
    rows.append(
        [
            "time to 80% held-out, less evals",
            *(
                f"{s.net_seconds(e):.0f} s (step {e.step})" if e else "not reached"
                for s, e in zip(sides, hit, strict=True)
            ),
        ]
    )
    if steps >= HOLD_FROM:
        rows.append(
            [
                f"lowest eval from step {HOLD_FROM}",
                *(f"{s.lowest_from(HOLD_FROM):.0%}" for s in sides),
            ]
        )
    for mark in marks:
        rows.append([f"after {mark} steps: acc / format (s)", *(cell(s.at(mark)) for s in sides)])
    for key, label in PHASES.items():
        if any(key in s.phases for s in sides):
            values = (f"{s.phases[key]:.1f}" if key in s.phases else "-" for s in sides)
            rows.append([f"s/step {label}", *values])
    rows.append(["peak RSS, process tree (MiB)", *(f"{s.peak_rss_mib:.0f}" for s in sides)])
    rows.append(["wall (s)", *(f"{s.wall_s:.0f}" for s in sides)])
    rows.append(["", *([""] * len(sides))])
    rows.append(["every eval: after N steps", *names])
    for step in sorted({e.step for s in sides for e in s.evals}):
        rows.append([f"{step:>3}", *(cell(s.at(step)) for s in sides)])
    lines = _table(rows)
    runs = {name: [s for s in sides if s.name == name] for name in ("ours", "trl")}
    if all(len(r) == 1 for r in runs.values()):
        ours_run, trl_run = runs["ours"][0], runs["trl"][0]
        ours, trl = ours_run.time_to(TARGET), trl_run.time_to(TARGET)
        ratio = (
            f"{ours_run.net_seconds(ours) / trl_run.net_seconds(trl):.2f}x"
            if ours and trl
            else "n/a (not reached)"
        )
        width = max(len(r[0]) for r in rows)
        lines.insert(2, f"{'  ours / TRL':<{width}}  {ratio} (target <= 0.5x)")
    elif any(len(r) > 1 for r in runs.values()):
        lines += ["", *_table(spread_rows({n: r for n, r in runs.items() if r}, marks))]
    return "\n".join(lines)


def spread_rows(runs: dict[str, list[Side]], marks: Sequence[int]) -> list[list[str]]:
    """Each side over its runs: median time to 80% (a run that never reached it counts as
    slower than any that did), runs that reached it at step 1, mean accuracy at each mark, and
    how low the runs fell from step 5 on."""
    names = list(runs)
    medians: dict[str, float] = {}
    rows = [["over runs", *(f"{n} ({len(runs[n])} runs)" for n in names)]]
    cells = []
    for name in names:
        times = [s.net_seconds(e) if (e := s.time_to(TARGET)) else math.inf for s in runs[name]]
        medians[name] = statistics.median(times)
        cells.append(f"{medians[name]:.0f} s" if math.isfinite(medians[name]) else "not reached")
    rows.append(["median time to 80% held-out, less evals", *cells])
    rows.append(
        [
            "runs at 80% after step 1",
            *(
                f"{sum(bool((e := s.at(1)) and e.accuracy >= TARGET) for s in runs[n])}"
                f"/{len(runs[n])}"
                for n in names
            ),
        ]
    )
    for mark in marks:
        means = []
        for name in names:
            values = [e.accuracy for s in runs[name] if (e := s.at(mark))]
            means.append(f"{statistics.fmean(values):.1%}" if values else "-")
        rows.append([f"mean accuracy after {mark} steps", *means])
    if max(marks) >= HOLD_FROM:
        lowest = {n: [s.lowest_from(HOLD_FROM) for s in runs[n]] for n in names}
        rows.append(
            [
                f"median lowest eval from step {HOLD_FROM}",
                *(f"{statistics.median(lowest[n]):.0%}" for n in names),
            ]
        )
        rows.append(
            [
                f"runs never below {HOLD:.0%} from step {HOLD_FROM}",
                *(f"{sum(v >= HOLD for v in lowest[n])}/{len(runs[n])}" for n in names),
            ]
        )
    if {"ours", "trl"} <= set(medians) and all(math.isfinite(m) for m in medians.values()):
        ratio = medians["ours"] / medians["trl"]
        rows.append(["ours / TRL, medians", f"{ratio:.2f}x (target <= 0.5x)", ""])
    if {"ours", "trl"} <= set(names):
        rows += against_trls_final(runs, max(marks))
    return rows


def against_trls_final(runs: dict[str, list[Side]], steps: int) -> list[list[str]]:
    """Each side's median accuracy after `steps`, ours less TRL's, and the median time each
    side's runs took to reach TRL's median accuracy after `steps` (less evals; a run that
    never reached it counts as slower than any that did): the harder level's targets."""
    finals = {n: [e.accuracy for s in runs[n] if (e := s.at(steps))] for n in ("ours", "trl")}
    if not all(finals.values()):
        return []
    median = {n: statistics.median(v) for n, v in finals.items()}
    target = median["trl"]
    times = {}
    for name in ("ours", "trl"):
        hits = [s.net_seconds(e) if (e := s.time_to(target)) else math.inf for s in runs[name]]
        times[name] = statistics.median(hits)
    gap = 100 * (median["ours"] - median["trl"])
    rows = [
        [f"median accuracy after {steps} steps", *(f"{median[n]:.0%}" for n in ("ours", "trl"))],
        [f"ours - TRL after {steps} steps", f"{gap:+.0f} points (target >= +5)", ""],
        [
            f"median time to TRL's {target:.0%}, less evals",
            *(f"{t:.0f} s" if math.isfinite(t) else "not reached" for t in times.values()),
        ],
    ]
    if all(math.isfinite(t) for t in times.values()) and times["trl"] > 0:
        ratio = times["ours"] / times["trl"]
        rows.append(["ours / TRL, to TRL's final", f"{ratio:.2f}x (target <= 0.5x)", ""])
    return rows


def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]


def main(argv: Sequence[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.summarize:
        print(summary_of(Path(args.summarize)))
        return
    steps, seeds = checked_steps_and_seeds(parser, args)
    if args.trl_child:
        run_trl_child(
            args.model, steps, args.trl_lr, args.events, args.trl_out, seeds[0], args.level
        )
        return
    sides = [s.strip() for s in args.sides.split(",") if s.strip()]
    if not sides or set(sides) - {"ours", "trl"} or len(set(sides)) != len(sides):
        parser.error(f"--sides {args.sides!r}: expected 'ours,trl', 'trl,ours', 'ours' or 'trl'")
    work = Path(args.work or tempfile.mkdtemp(prefix="bench_vs_trl_")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    print(
        f"bench_vs_trl: arithmetic level {args.level}, {steps} steps per side, "
        f"{' then '.join(sides)}; logs in {work}",
        flush=True,
    )
    results = run_sides(sides, steps, seeds, args, work)
    print("\n" + summary(results, steps))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"steps": steps, "sides": [asdict(s) for s in results]}, indent=1))
    print(f"results: {out}")


def summary_of(path: Path) -> str:
    """The summary of a results file that an earlier invocation wrote (`--out`)."""
    data = json.loads(path.read_text())
    sides = []
    for raw in data["sides"]:
        side = Side(**{k: v for k, v in raw.items() if k != "evals"})
        side.evals = [Eval(**e) for e in raw["evals"]]
        sides.append(side)
    return summary(sides, data["steps"])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps per side")
    parser.add_argument("--quick", action="store_true", help="2 steps per side (smoke run)")
    parser.add_argument("--sides", default="ours,trl", help="which sides, in this order")
    parser.add_argument("--trl-lr", type=float, default=1e-3, help="TRL's learning rate")
    parser.add_argument(
        "--level", type=int, default=LEVEL, help="arithmetic level of the task (1-4), both sides"
    )
    parser.add_argument(
        "--trl-seed",
        default=str(SEED),
        help="seed of TRL's trainer (LoRA init, sampling), or several ('0,1,2'), one run "
        "each; the task's data stay seed 0",
    )
    parser.add_argument(
        "--repeats", type=int, default=1, help="runs of ours (they differ in their sampling)"
    )
    parser.add_argument("--ours", action="append", default=[], help="extra rl.loop.train key=value")
    parser.add_argument("--work", default="", help="run directory (default: a new temp dir)")
    parser.add_argument("--out", default="bench/results/bench_vs_trl.json", help="JSON results")
    parser.add_argument("--summarize", metavar="JSON", help="print the summary of a results file")
    # The TRL child (run by the parent in .venv-trl).
    parser.add_argument("--trl-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--events", help=argparse.SUPPRESS)
    parser.add_argument("--trl-out", help=argparse.SUPPRESS)
    return parser


def checked_steps_and_seeds(
    parser: argparse.ArgumentParser, args: argparse.Namespace
) -> tuple[int, list[int]]:
    """Steps per side and TRL's seeds; refuses bad values (exits) before anything runs."""
    steps = 2 if args.quick else args.steps
    if steps < 1:
        parser.error(f"--steps {steps} must be >= 1")
    if args.repeats < 1:
        parser.error(f"--repeats {args.repeats} must be >= 1")
    if args.level not in LEVELS:
        parser.error(f"--level {args.level}: expected one of {sorted(LEVELS)}")
    try:
        seeds = [int(x) for x in args.trl_seed.split(",")]
    except ValueError:
        parser.error(f"--trl-seed {args.trl_seed!r}: expected an integer or a list like '0,1,2'")
    if len(set(seeds)) != len(seeds):
        parser.error(f"--trl-seed {args.trl_seed!r}: a seed repeats (a TRL run is deterministic)")
    return steps, seeds


def run_sides(
    sides: list[str], steps: int, seeds: list[int], args: argparse.Namespace, work: Path
) -> list[Side]:
    """Every run of every side, in order, each summarised as it ends."""
    model_path = resolve_model_path() if "trl" in sides else ""
    results = []
    for name in sides:
        if name == "ours":
            for i in range(args.repeats):
                tag = "ours" if args.repeats == 1 else f"ours-{i + 1}"
                results.append(run_ours(steps, work, args.ours, tag, args.level))
                print(summary(results[-1:], steps), flush=True)
        else:
            for seed in seeds:
                tag = "trl" if len(seeds) == 1 else f"trl-s{seed}"
                results.append(run_trl(steps, args.trl_lr, work, model_path, seed, tag, args.level))
                print(summary(results[-1:], steps), flush=True)
    return results


if __name__ == "__main__":
    main()
