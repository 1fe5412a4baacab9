"""`stable_reinforce` against `importance_sampling` 3 steps off-policy: the sampler-trainer KL.

    python bench/bench_stable_reinforce.py                   # SmolLM2, arithmetic, 6 steps/arm
    python bench/bench_stable_reinforce.py steps=10 lag=2 out=/tmp/sr.json

Arms, one after another on one training client (reset to the same initial adapter and an
empty AdamW state before each, so every arm starts from the same weights) and one vLLM
sampler (rl.loop.train's preset: fp32 trainer, merged weight sync); every arm sees the same
problems in the same order: each loss in `losses`, `lag` steps off-policy, then an on-policy
reference arm (lag 0, `on_policy_steps` steps). One reference serves both losses: on-policy,
r = 1 up to numerics, where stable_reinforce's gradient is importance sampling's and its k3
term vanishes.

Off-policy is exact, not "up to": the batch trained at step j was sampled with the weights
after step j - lag (the first `lag` batches with the initial weights). Each step: sample the
next batch with the current weights, train the batch sampled `lag` steps ago (one
forward_backward with the arm's loss at its default config: Tinker's summed loss with
unscaled advantages, as the cookbook sends), one AdamW step, sync the new weights.

Measured, per step, on the trained batch's sampled tokens: the sampler-trainer KL
(`kl_sample_train_v1` = mean(q - p), as rl.loop and tinker-cookbook log it, and `_v2` =
mean((q - p)^2) / 2), with q the sampler's logprobs recorded at sampling time and p the
trainer's before the step. Reported per arm: their means over the steps where the arm is
exactly `lag` stale, the last step's v1, KL_off / KL_on per loss, stable_reinforce's masked
fraction, the mean reward of the batches sampled in the last 3 steps and the greedy held-out
accuracy after the last step.
"""

from __future__ import annotations

import json
import random
import statistics
import sys
import tempfile
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from examples.rl_loop import accuracy, group_datums, make_problems, prompt_tokens, reward  # noqa: E402
from rl.cli import parse_config  # noqa: E402


@dataclass(frozen=True)
class BenchConfig:
    steps: int = 6
    """optimizer steps per off-policy arm"""
    lag: int = 3
    """steps off-policy of the off-policy arms"""
    losses: str = "importance_sampling,stable_reinforce"
    """losses run off-policy, comma-separated, each at its default loss_fn_config"""
    on_policy_loss: str = "importance_sampling"
    """the on-policy reference arm's loss (at lag 0, r = 1 up to numerics, where
    stable_reinforce's gradient is importance sampling's and its k3 term vanishes)"""
    on_policy_steps: int = 3
    """steps of the on-policy reference arm"""
    groups_per_batch: int = 6
    """problems per step"""
    group_size: int = 8
    """samples per problem"""
    max_tokens: int = 16
    """tokens sampled per reply"""
    learning_rate: float = 1e-3
    """AdamW learning rate (rl.loop.train's preset)"""
    rank: int = 16
    """LoRA rank"""
    num_test: int = 30
    """held-out problems, greedy, after each arm"""
    base_model: str = "SmolLM2-135M-Instruct"
    """model"""
    seed: int = 0
    """problems and LoRA init"""
    out: str = ""
    """write the figures as JSON here too ('' = print only)"""


@dataclass
class Batch:
    datums: list[Any]
    rewards: list[float]


def sample_batch(config: BenchConfig, sampler: Any, tokenizer: Any, problems: list) -> Batch:
    """One batch sampled now (not later: a merged-mode client whose merge was replaced falls
    back to the slow LoRA path). Groups whose rewards are all equal are dropped."""
    import rl

    params = rl.types.SamplingParams(max_tokens=config.max_tokens, temperature=1.0)
    prompts = [prompt_tokens(tokenizer, p) for p in problems]
    futures = [
        sampler.sample(rl.types.ModelInput.from_ints(prompt), config.group_size, params)
        for prompt in prompts
    ]
    datums, rewards = [], []
    for future, prompt, problem in zip(futures, prompts, problems, strict=True):
        replies = future.result().sequences
        group = [reward(tokenizer.decode(s.tokens), problem) for s in replies]
        rewards += group
        if len(set(group)) > 1:
            datums += group_datums(rl, prompt, replies, group)
    return Batch(datums, rewards)


def kl_of(datums: list[Any], output: Any) -> tuple[float, float]:
    """(mean(q - p), mean((q - p)^2) / 2) over the sampled tokens (weight > 0)."""
    diffs = []
    for datum, out in zip(datums, output.loss_fn_outputs, strict=True):
        weights = datum.loss_fn_inputs["weights"].tolist()
        q = datum.loss_fn_inputs["logprobs"].tolist()
        p = out["logprobs"].tolist()
        diffs += [qt - pt for w, qt, pt in zip(weights, q, p, strict=True) if w > 0]
    n = max(len(diffs), 1)
    return sum(diffs) / n, sum(d * d for d in diffs) / (2 * n)


def run_arm(
    config: BenchConfig,
    client: Any,
    tokenizer: Any,
    init: str,
    arm: tuple[str, int, int],
) -> dict[str, Any]:
    """One arm (loss, lag, steps) from the initial adapter: per-step figures, held-out accuracy."""
    import rl

    loss_fn, lag, num_steps = arm
    client.load_state_with_optimizer(init).result()
    rng = random.Random(config.seed)
    adam = rl.types.AdamParams(learning_rate=config.learning_rate, beta2=0.95, eps=1e-8)
    sampler = client.save_weights_and_get_sampling_client()
    queue: deque[Batch] = deque(
        sample_batch(config, sampler, tokenizer, make_problems(config.groups_per_batch, rng))
        for _ in range(lag)
    )
    steps = []
    for step in range(num_steps):
        began = time.perf_counter()
        problems = make_problems(config.groups_per_batch, rng)
        fresh = sample_batch(config, sampler, tokenizer, problems)
        queue.append(fresh)
        batch = queue.popleft()  # sampled with the weights after step - lag
        figures: dict[str, float] = {"reward": statistics.mean(fresh.rewards)}
        if batch.datums:
            output = client.forward_backward(batch.datums, loss_fn).result()
            client.optim_step(adam).result()
            figures["kl_v1"], figures["kl_v2"] = kl_of(batch.datums, output)
            figures.update({k: v for k, v in output.metrics.items() if k.endswith(":mean")})
        sampler = client.save_weights_and_get_sampling_client()
        figures["seconds"] = time.perf_counter() - began
        print(
            f"  {loss_fn} lag={lag} step {step}: "
            + " ".join(f"{k}={v:.4g}" for k, v in figures.items()),
            flush=True,
        )
        steps.append(figures)
    test = make_problems(config.num_test, random.Random(config.seed + 1))
    held_out = accuracy(rl, sampler, tokenizer, test)
    return {"loss_fn": loss_fn, "lag": lag, "steps": steps, "held_out": held_out}


def summary(arm: dict[str, Any]) -> dict[str, float]:
    """KL means over the steps where the arm is exactly `lag` stale; reward of the last 3."""
    steady = [s for s in arm["steps"][arm["lag"] :] if "kl_v1" in s]
    return {
        "kl_v1": statistics.mean(s["kl_v1"] for s in steady),
        "kl_v2": statistics.mean(s["kl_v2"] for s in steady),
        "kl_v1_last": steady[-1]["kl_v1"],
        "reward_last3": statistics.mean(s["reward"] for s in arm["steps"][-3:]),
        "held_out": arm["held_out"],
        "masked_fraction": statistics.mean(s.get("masked_fraction:mean", 0.0) for s in steady),
        "step_s": statistics.mean(s["seconds"] for s in arm["steps"]),
    }


def row(arm: dict[str, Any]) -> str:
    figures = summary(arm)
    return (
        f"| {arm['loss_fn']} | {arm['lag']} | {len(arm['steps'])} | {figures['kl_v1']:.2e} | "
        f"{figures['kl_v1_last']:.2e} | {figures['kl_v2']:.2e} | "
        f"{figures['masked_fraction']:.1%} | {figures['reward_last3']:+.2f} | "
        f"{figures['held_out']:.0%} | {figures['step_s']:.0f} |"
    )


HEADER = (
    "| loss | lag | steps | KL v1 mean(q-p) | KL v1, last step | KL v2 | masked | "
    "reward, last 3 | held-out | s/step |\n|---|---|---|---|---|---|---|---|---|---|"
)


def main(argv: list[str]) -> dict[str, Any]:
    from rl.loop.config import Config
    from rl.loop.train import service_for

    config = parse_config(BenchConfig, argv)
    began = time.perf_counter()
    plan = [(loss_fn, config.lag, config.steps) for loss_fn in config.losses.split(",")]
    plan.append((config.on_policy_loss, 0, config.on_policy_steps))
    arms = []
    with tempfile.TemporaryDirectory() as log_dir:
        service = service_for(Config(base_model=config.base_model, log_dir=log_dir))
        try:
            client = service.create_lora_training_client(
                config.base_model, rank=config.rank, seed=config.seed
            )
            tokenizer = client.get_tokenizer()
            init = client.save_state("init").result().path
            for arm in plan:
                arms.append(run_arm(config, client, tokenizer, init, arm))
                print(HEADER + "\n" + row(arms[-1]), flush=True)
        finally:
            service.close()
    print(f"\noff-policy arms {config.lag} steps stale; wall {time.perf_counter() - began:.0f} s")
    print(HEADER)
    for arm in arms:
        print(row(arm))
    reference = summary(arms[-1])
    ratios = {}
    for arm in arms[:-1]:
        figures = summary(arm)
        ratios[arm["loss_fn"]] = {k: figures[k] / reference[k] for k in ("kl_v1", "kl_v2")}
        print(
            f"{arm['loss_fn']}: KL_off / KL_on = {ratios[arm['loss_fn']]['kl_v1']:.3g} (v1), "
            f"{ratios[arm['loss_fn']]['kl_v2']:.3g} (v2)"
        )
    first = summary(arms[0])
    for arm in arms[1:-1]:  # against the first off-policy arm (importance_sampling by default)
        figures = summary(arm)
        print(
            f"{arm['loss_fn']} / {arms[0]['loss_fn']}, both off-policy: KL "
            f"{figures['kl_v1'] / first['kl_v1']:.3g} (v1), {figures['kl_v2'] / first['kl_v2']:.3g} (v2)"
        )
    result = {"config": config.__dict__, "arms": arms, "ratios": ratios}
    if config.out:
        Path(config.out).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
